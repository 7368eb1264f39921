"""fastroberta.kernels: Triton kernels for RoBERTa pretraining, usable without the rest of fastroberta.

    from fastroberta.kernels import (layer_norm, attention, attention_packed, attention_varlen, prepare_mask,
                                     mlm_cross_entropy, gelu_backward_bias_grad, linear_gelu,
                                     dgrad_gelu_bias_grad, FusedLayerNorm)

Each op runs its Triton kernel on CUDA tensors (or on CPU under ``TRITON_INTERPRET=1``) and falls back to
the eager definition in ``fastroberta.kernels.reference`` otherwise.
"""
from . import reference
from .attention import PreparedMask, attention, attention_packed, attention_varlen, prepare_mask
from .cross_entropy import mlm_cross_entropy
from .gelu import gelu_backward_bias_grad
from .layer_norm import FusedLayerNorm, layer_norm
from .linear_gelu import dgrad_gelu_bias_grad, linear_gelu

__all__ = ["layer_norm", "FusedLayerNorm", "attention", "attention_packed", "attention_varlen", "prepare_mask",
           "PreparedMask",
           "mlm_cross_entropy", "gelu_backward_bias_grad", "linear_gelu", "dgrad_gelu_bias_grad", "reference"]
