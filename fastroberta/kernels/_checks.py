"""Input checks and backend choice shared by the kernel entry points.

A Triton kernel runs on CUDA tensors, or on CPU tensors when Triton's interpreter is on
(``TRITON_INTERPRET=1`` set before the kernel modules are imported). Anything else falls back to the eager
reference in ``reference.py``.
"""
import contextlib
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_active():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(tensor):
    """True when a Triton kernel can run on ``tensor``'s device. Meta tensors count: the custom ops' fake
    implementations run on them and nothing launches (``benchmarks/bench_model.py`` counts a step that way)."""
    return tensor.is_cuda or tensor.is_meta or (tensor.device.type == "cpu" and interpreter_active())


def on_device(t):
    """The context to launch a kernel on ``t``: its GPU made current (Triton launches on the current device and
    its current stream, so a tensor on another GPU would be read from the wrong device, or race the torch ops on
    its own device's stream); nothing on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_tensor(name, t, *, dtypes=FLOAT_DTYPES, ndim=None, device=None):
    """Raise TypeError/ValueError naming ``name`` when ``t`` is not a tensor of the expected kind."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of {allowed}")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


def new_dropout_seed(device=None):
    """A Philox seed for one dropout call: a one-element int64 tensor drawn by ``torch.randint`` from torch's
    generator of ``device`` (default: CPU). The kernels read it from memory, so nothing reads it on the host:
    no device sync, inside a ``torch.compile`` region a graph op, and in a captured CUDA graph a draw that
    each replay repeats (torch's CUDA generator supports capture). ``torch.manual_seed`` or a restored RNG
    state (activation checkpointing, resume) reproduces it."""
    return new_dropout_seeds(1, device)


def new_dropout_seeds(n, device=None):
    """``n`` Philox seeds in one draw (one launch instead of ``n``): an int64 [n] tensor whose one-element slices
    ``seeds[i:i + 1]`` (views: no launch, no copy) a model hands to its dropout calls as ``dropout_seed``."""
    return torch.randint(0, 2**31 - 1, (n,), dtype=torch.int64, device=device)


def dropout_seed_for(dropout_p, dropout_seed, device):
    """The seed tensor a dropout call reads: None without dropout, ``dropout_seed`` when given (checked: a
    one-element int64 tensor on ``device``), else a new draw."""
    if dropout_p <= 0.0:
        return None
    if dropout_seed is None:
        return new_dropout_seed(device)
    if not isinstance(dropout_seed, torch.Tensor) or dropout_seed.dtype != torch.int64 or dropout_seed.numel() != 1:
        what = (f"{dropout_seed.dtype} tensor of shape {tuple(dropout_seed.shape)}"
                if isinstance(dropout_seed, torch.Tensor) else type(dropout_seed).__name__)
        raise TypeError(f"dropout_seed must be a one-element int64 tensor, got {what}")
    if dropout_seed.device != device:
        raise ValueError(f"dropout_seed is on {dropout_seed.device} but the input is on {device}")
    return dropout_seed


def known_true(condition):
    """``bool(condition)`` for a condition on sizes, False where torch.compile traces a size it cannot know (one
    from ``nonzero``): branching on it would break the graph. For shortcuts whose other branch is also correct."""
    try:
        from torch.fx.experimental.symbolic_shapes import guard_or_false
    except ImportError:  # torch < 2.7: no unbacked sizes to worry about in its supported traces
        return bool(condition)
    return guard_or_false(condition)


def known_empty(t):
    """``t.numel() == 0`` by ``known_true``: the kernels' host code also handles an empty tensor."""
    return known_true(t.numel() == 0)


def compiling():
    """True while torch.compile (Dynamo) traces the caller: checks that must read a tensor's values on the
    host (a graph break) are skipped then; see each entry point's docstring for which."""
    return torch.compiler.is_compiling()


def autocast_enabled(device):
    """Whether a ``torch.autocast`` region is active for ``device``'s type. Only the types autocast knows are
    asked (torch raises for others, e.g. the meta tensors of the step cost model)."""
    return device.type in ("cuda", "cpu", "xpu", "mps", "hpu") and torch.is_autocast_enabled(device.type)
