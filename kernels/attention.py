"""Bidirectional attention with a key-padding mask. Placeholder: dispatches to the eager reference until
the Triton kernel lands (see the attention issue)."""
from . import reference


def attention(q, k, v, attention_mask=None, dropout_p=0.0, softmax_scale=None):
    return reference.attention(q, k, v, attention_mask, dropout_p=dropout_p, softmax_scale=softmax_scale)


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None):
    return reference.attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=dropout_p,
                                      softmax_scale=softmax_scale)
