"""The numeric precision of a run: fp16 (with dynamic loss scaling) on CUDA, bf16 where the hardware has it,
fp32 otherwise."""
from fastroberta.training.errors import ConfigError

PRECISIONS = ("auto", "fp16", "bf16", "fp32")


def cpu_has_native_bf16():
    """True when the CPU computes bf16 matmuls natively; elsewhere they are emulated and ~100x slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(requested, on_cuda, has_native_bf16=None):
    """The precision --precision asks for on this machine; ConfigError for one it cannot run."""
    precision = requested
    if precision == "auto":
        native = cpu_has_native_bf16 if has_native_bf16 is None else has_native_bf16
        precision = "fp16" if on_cuda else ("bf16" if native() else "fp32")
    if precision == "fp16" and not on_cuda:
        raise ConfigError("--precision fp16 needs a CUDA GPU (DeepSpeed's fp16 loss scaling is not supported on "
                          "CPU); use --precision bf16 or fp32")
    return precision
