"""Input checks and backend choice shared by the kernel entry points.

A Triton kernel runs on CUDA tensors, or on CPU tensors when Triton's interpreter is on
(``TRITON_INTERPRET=1`` set before the kernel modules are imported). Anything else falls back to the eager
reference in ``reference.py``.
"""
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_active():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(tensor):
    """True when a Triton kernel can run on ``tensor``'s device."""
    return tensor.is_cuda or (tensor.device.type == "cpu" and interpreter_active())


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


def dropout_seed():
    """A Philox seed for one dropout call, drawn from torch's default (CPU) generator: no device sync, and
    ``torch.manual_seed`` or a restored RNG state (activation checkpointing, resume) reproduces it."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())
