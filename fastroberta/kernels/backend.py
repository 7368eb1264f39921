"""Which implementation of the fused ops a module runs: the Triton kernels or their eager twins.

    KERNEL_CHOICES = ("auto", "triton", "torch")

"auto" is Triton on CUDA and the eager reference elsewhere, unless the ``FASTROBERTA_KERNELS`` environment
variable names a choice. A module that calls the ops (``KernelSwitch``) keeps its choice as a string and
resolves it once, the first time its forward sees a device; moving the module (``.to()``, ``.cuda()``, any
``_apply``) forgets the resolution, so the next forward resolves it again for the new device.
"""
import functools
import os

import torch

from . import reference
from ._checks import autocast_enabled, compiling, interpreter_active

KERNEL_CHOICES = ("auto", "triton", "torch")


def check_kernels(value, source="kernels"):
    if value not in KERNEL_CHOICES:
        raise ValueError(f"{source} must be one of {KERNEL_CHOICES}, got {value!r}")
    return value


def resolve_kernels(kernels, device):
    """"triton" or "torch": what ``kernels`` means on ``device``."""
    check_kernels(kernels)
    if kernels == "auto":
        env = os.environ.get("FASTROBERTA_KERNELS", "").strip()
        kernels = check_kernels(env, "FASTROBERTA_KERNELS") if env else "auto"
    if kernels == "auto":
        kernels = "triton" if device.type == "cuda" else "torch"
    usable = device.type in ("cuda", "meta") or (device.type == "cpu" and interpreter_active())
    if kernels == "triton" and not usable:
        raise ValueError(f"kernels='triton' needs CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 "
                         "before importing fastroberta, or use kernels='torch'")
    return kernels


class OpSet:
    """The fused ops of one implementation (a plain class, not a SimpleNamespace: torch.compile can build
    it while tracing a model's first call)."""

    def __init__(self, name, layer_norm, attention, attention_packed, attention_varlen, mlm_cross_entropy,
                 linear_gelu, dgrad_gelu_bias_grad, prepare_mask):
        self.name = name
        self.prepare_mask = prepare_mask  # an attention mask made ready once for every layer of a forward
        self.layer_norm = layer_norm
        self.attention = attention
        self.attention_packed = attention_packed
        self.attention_varlen = attention_varlen
        self.mlm_cross_entropy = mlm_cross_entropy
        self.linear_gelu = linear_gelu
        self.dgrad_gelu_bias_grad = dgrad_gelu_bias_grad


def _outside_autocast(fn):
    """The eager twin ``fn`` run as the Triton kernels run (custom ops, which autocast never recasts): in its
    inputs' dtypes with fp32 statistics, even inside a ``torch.autocast`` region."""
    @functools.wraps(fn)
    def run(x, *args, **kwargs):
        if autocast_enabled(x.device):
            with torch.autocast(x.device.type, enabled=False):
                return fn(x, *args, **kwargs)
        return fn(x, *args, **kwargs)
    return run


def _torch_ops():
    # The eager twins, with the keyword arguments of the Triton entry points that only concern host-side
    # checks accepted and ignored (the reference reads its inputs on the host anyway).
    # dropout_seed: the eager twins draw their masks from torch's generator; a seed meant for a kernel is ignored.
    def attention(q, k, v, attention_mask=None, dropout_p=0.0, softmax_scale=None, dropout_seed=None):
        return reference.attention(q, k, v, attention_mask, dropout_p=dropout_p, softmax_scale=softmax_scale)

    def attention_packed(qkv, attention_mask=None, dropout_p=0.0, softmax_scale=None, dropout_seed=None):
        return reference.attention_packed(qkv, attention_mask, dropout_p=dropout_p, softmax_scale=softmax_scale)

    def attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, validate=True,
                         dropout_seed=None):
        return reference.attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=dropout_p,
                                          softmax_scale=softmax_scale)

    def mlm_cross_entropy(hidden, weight, bias, labels, ignore_index=-100, return_num_correct=False, *,
                          validate=True, labelled_rows_only=False):
        return reference.mlm_cross_entropy(hidden, weight, bias, labels.long(), ignore_index=ignore_index,
                                           return_num_correct=return_num_correct)

    def layer_norm(x, weight, bias, eps=1e-5, residual=None, dropout_p=0.0, input_bias=None, dropout_seed=None):
        from .layer_norm import _check_inputs
        _check_inputs(x, weight, bias, eps, residual, dropout_p, input_bias)  # the kernel's clear errors
        return reference.layer_norm(x, weight, bias, eps, residual=residual, dropout_p=dropout_p,
                                    input_bias=input_bias)

    return OpSet("torch", *(_outside_autocast(op) for op in (layer_norm, attention, attention_packed, attention_varlen,
                                                              mlm_cross_entropy, reference.linear_gelu,
                                                              reference.dgrad_gelu_bias_grad)),
                 prepare_mask=lambda attention_mask: attention_mask)  # the eager path reads the mask as it is


def _triton_ops():
    from .attention import attention, attention_packed, attention_varlen, prepare_mask
    from .cross_entropy import mlm_cross_entropy
    from .layer_norm import layer_norm
    from .linear_gelu import dgrad_gelu_bias_grad, linear_gelu
    return OpSet("triton", layer_norm, attention, attention_packed, attention_varlen, mlm_cross_entropy,
                 linear_gelu, dgrad_gelu_bias_grad, prepare_mask)


_OPS = {}


def ops_for(kernels, device):
    """The op namespace (layer_norm, attention, attention_packed, attention_varlen, mlm_cross_entropy,
    linear_gelu, dgrad_gelu_bias_grad, prepare_mask) for ``kernels`` on ``device``."""
    name = resolve_kernels(kernels, device)
    if name not in _OPS:
        _OPS[name] = _triton_ops() if name == "triton" else _torch_ops()
    return _OPS[name]


class KernelSwitch:
    """Mixin (listed before ``nn.Module``) for modules whose forward calls the fused ops.

    ``self.kernels`` is the choice; setting it validates it and passes it to every KernelSwitch submodule.
    ``self.ops(device)`` is the resolved op namespace, held in ``self._ops`` until the module moves."""

    def _init_kernels(self, kernels):
        object.__setattr__(self, "_kernels", check_kernels(kernels))
        object.__setattr__(self, "_ops", None)

    @property
    def kernels(self):
        return self._kernels

    @kernels.setter
    def kernels(self, value):
        check_kernels(value)
        for m in self.modules():
            if isinstance(m, KernelSwitch):
                object.__setattr__(m, "_kernels", value)
                object.__setattr__(m, "_ops", None)

    def ops(self, device):
        ops = self._ops
        if ops is None:
            ops = ops_for(self._kernels, device)
            if not compiling():  # torch.compile resolves it while tracing (once per compiled graph)
                object.__setattr__(self, "_ops", ops)
        return ops

    def _apply(self, fn, *args, **kwargs):
        object.__setattr__(self, "_ops", None)
        return super()._apply(fn, *args, **kwargs)
