"""Training metrics: throughput, model FLOPs utilisation (MFU), memory, and the metrics log.

Throughput counts real tokens (``attention_mask.sum()``), never padding. Model FLOPs per token come from
``RobertaForMaskedLM.flops_per_token(seq_len, mask_prob)``: forward + backward = 3 x the forward matmul FLOPs,
6 x (per-token encoder matmul parameters) + 12 x layers x hidden x seq_len for the attention scores and weighted
sum + the MLM head (dense and tied decoder) on the masked share of tokens; activation-checkpointing recompute is not counted (that is what makes it *model* FLOPs). MFU is
achieved model FLOP/s over the accelerators' dense peak for the run's precision, from ``GPU_PEAK_TFLOPS``
by device name, or from ``--peak-tflops`` / ``FASTROBERTA_PEAK_TFLOPS`` (per device). On CPU there is no
meaningful peak, so MFU is null unless a peak is given.
"""
import json
import math
import os
import resource
import time

import torch

# Dense (no sparsity) peak TFLOP/s per device: (fp16/bf16 tensor core, tf32 tensor core, plain fp32).
# Matched by substring of torch.cuda.get_device_name(), first match wins: specific names come first.
GPU_PEAK_TFLOPS = [
    ("H200 NVL", (835.0, 418.0, 60.0)),
    ("H200", (989.0, 494.0, 67.0)),
    ("GH200", (989.0, 494.0, 67.0)),
    ("H100 NVL", (835.0, 418.0, 60.0)),
    ("H100 PCIe", (756.0, 378.0, 51.0)),
    ("H100", (989.0, 494.0, 67.0)),
    ("H800", (989.0, 494.0, 67.0)),
    ("B200", (2250.0, 1100.0, 80.0)),
    ("A100", (312.0, 156.0, 19.5)),
    ("A800", (312.0, 156.0, 19.5)),
    ("L40S", (362.0, 183.0, 91.6)),
    ("L40", (181.0, 90.5, 90.5)),
    ("L4", (121.0, 60.0, 30.3)),
    ("A10", (125.0, 62.5, 31.2)),
    ("RTX A6000", (155.0, 77.4, 38.7)),
    ("RTX 4090", (165.0, 82.6, 82.6)),
    ("RTX 3090", (71.0, 35.6, 35.6)),
    ("V100", (125.0, 15.7, 15.7)),
    ("T4", (65.0, 8.1, 8.1)),
]
# HBM bandwidth in TB/s (10^12 bytes/s) per device, matched like GPU_PEAK_TFLOPS (vendor datasheets; the SXM
# parts). benchmarks/bench_model.py's roofline reads both tables.
GPU_HBM_TBPS = [
    ("H200 NVL", 4.8),
    ("H200", 4.8),
    ("GH200", 4.0),
    ("H100 NVL", 3.9),
    ("H100 PCIe", 2.0),
    ("H100", 3.35),
    ("B200", 8.0),
    ("A100", 2.039),
]
PEAK_ENV = "FASTROBERTA_PEAK_TFLOPS"
_clock = time.perf_counter


def peak_tflops(device, precision, override=None):
    """Dense peak TFLOP/s of one device for ``precision`` ("fp16" | "bf16" | "fp32"), or None if unknown.
    ``override`` (or the FASTROBERTA_PEAK_TFLOPS environment variable) wins over the table."""
    if override is None and os.environ.get(PEAK_ENV, "").strip():
        try:
            override = float(os.environ[PEAK_ENV])
        except ValueError:
            raise ValueError(f"{PEAK_ENV} must be a number of TFLOP/s, got {os.environ[PEAK_ENV]!r}") from None
    if override is not None:
        if not override > 0:
            raise ValueError(f"peak TFLOP/s must be positive, got {override}")
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32, fp32) in GPU_PEAK_TFLOPS:
        if key in name:
            if precision in ("fp16", "bf16"):
                return half
            return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
    return None


def peak_memory_mib(device):
    """Peak memory so far in MiB: allocated accelerator memory on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def perplexity(loss):
    return math.exp(loss) if loss < 700 else float("inf")


class Throughput:
    """Tokens, samples and model FLOPs per second over the window since the last ``read()``; time spent
    outside training steps (evaluation, checkpoints) is excluded with ``pause()`` / ``resume()``."""

    def __init__(self, flops_per_token, peak_tflops_per_device, world_size):
        self.flops_per_token = flops_per_token
        self.peak = peak_tflops_per_device
        self.world_size = world_size
        self._reset()

    def _reset(self):
        # A new window starts paused; resume() starts its clock.
        self.tokens = 0
        self.samples = 0
        self.elapsed = 0.0
        self._start = None

    def pause(self):
        if self._start is not None:
            self.elapsed += _clock() - self._start
            self._start = None

    def resume(self):
        if self._start is None:
            self._start = _clock()

    def add(self, tokens, samples):
        self.tokens += tokens
        self.samples += samples

    def tokens_per_s(self):
        """Rate so far in the current window, without ending it."""
        running = _clock() - self._start if self._start is not None else 0.0
        return self.tokens / max(self.elapsed + running, 1e-9)

    def read(self):
        """Rates over the window (all ranks together); a new, paused window starts."""
        self.pause()
        dt = max(self.elapsed, 1e-9)
        tokens_per_s = self.tokens / dt
        tflops = self.flops_per_token * tokens_per_s / 1e12
        out = {
            "tokens_per_s": tokens_per_s,
            "samples_per_s": self.samples / dt,
            "tflops": tflops,
            "mfu": tflops / (self.peak * self.world_size) if self.peak else None,
        }
        self._reset()
        return out


class MetricsLog:
    """One JSON object per line in ``<output>/metrics.jsonl``, and optionally TensorBoard scalars.
    Only the writing rank opens anything; others call the same methods as no-ops."""

    def __init__(self, path, enabled=True, tensorboard_dir=None, resume_step=None):
        self.path = path
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_step is None:
            mode = "w"
        else:
            self._truncate_after(resume_step)
            mode = "a"
        self._file = open(path, mode, buffering=1)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(tensorboard_dir)

    def _truncate_after(self, step):
        """Drop records of steps after ``step``: a resumed run repeats them from its checkpoint."""
        if not os.path.isfile(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if record.get("step", 0) <= step:
                    keep.append(json.dumps(record))
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def log(self, record):
        if not self.enabled:
            return
        # NaN/Infinity are not JSON: a non-finite value (an fp16 overflow's grad norm) is written as null.
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path):
    """The records of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
