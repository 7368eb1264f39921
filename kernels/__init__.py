"""fastroberta.kernels: Triton kernels for RoBERTa pretraining, usable without the rest of fastroberta.

    from fastroberta.kernels import (layer_norm, attention, attention_packed, attention_varlen,
                                     mlm_cross_entropy, FusedLayerNorm)

Each op runs its Triton kernel on CUDA tensors (or on CPU under ``TRITON_INTERPRET=1``) and falls back to
the eager definition in ``fastroberta.kernels.reference`` otherwise.
"""
if __name__ != "fastroberta.kernels":
    # This folder found as some other package, e.g. a top-level "kernels" when the repository root is on sys.path
    # and transformers probes for Hugging Face's `kernels` package by importing it: be fastroberta.kernels itself
    # (the import system returns what sys.modules holds), never a second copy that would register the custom
    # ops again over the first one's.
    import importlib
    import sys

    sys.modules[__name__] = importlib.import_module("fastroberta.kernels")
else:
    from . import reference
    from .attention import attention, attention_packed, attention_varlen
    from .cross_entropy import mlm_cross_entropy
    from .layer_norm import FusedLayerNorm, layer_norm

    __all__ = ["layer_norm", "FusedLayerNorm", "attention", "attention_packed", "attention_varlen",
               "mlm_cross_entropy", "reference"]
