"""Eager PyTorch definitions of every fused op in ``fastroberta.kernels``.

These are the ground truth of the kernel tests, the "eager PyTorch" side of the benchmarks and the CPU
fallback of the model (``kernels="torch"``). They favour clarity over speed, but follow the same numerical
rules as the kernels (DESIGN.md): statistics, softmax and reductions in fp32 whatever the input dtype, a
query row with no real key gives zeros (never NaN), and an MLM batch without a labelled token gives loss 0.

    layer_norm(x, w, b, eps, residual, p, b_in) = LN(dropout_p(x + b_in) + residual) * w + b   over the last dim
    attention(q, k, v, mask, p, scale)     = dropout_p(softmax(scale * q k^T + mask_bias)) v
    attention_packed(qkv, mask, p, scale)  = attention on the views q, k, v of a fused [B, L, 3, H, D] qkv
    attention_varlen(q, k, v, cu_seqlens)  = attention per sequence of a packed [total_tokens, H, D] batch
    mlm_cross_entropy(h, W, b, labels)     = mean over labelled rows of logsumexp(h W^T + b) - (h W^T + b)[label]
    gelu_backward_bias_grad(dact, pre)     = (dact * GELU'(pre), its column sums in fp32)
    linear_gelu(x, w, b)                   = (x W^T + b, GELU(x W^T + b))
    dgrad_gelu_bias_grad(dout, w, pre)     = gelu_backward_bias_grad(dout W, pre)
"""
import math

import torch
import torch.nn.functional as F


def layer_norm(x, weight, bias, eps=1e-5, residual=None, dropout_p=0.0, dropout_mask=None, input_bias=None):
    """LN(dropout(x + input_bias) + residual) over the last dimension, in fp32, returned in x's dtype.

    ``input_bias`` ([N] or None) is the bias of the linear layer that made x. ``dropout_mask`` (bool, x's shape)
    replaces the random draw: tests use it to replay the mask a kernel used.
    """
    h = x.float()
    if input_bias is not None:
        h = h + input_bias.float()
    if dropout_mask is not None:
        h = h * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        h = F.dropout(h, dropout_p, training=True)
    if residual is not None:
        h = h + residual.float()
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    return F.layer_norm(h, h.shape[-1:], w, b, eps).to(x.dtype)


def attention(q, k, v, attention_mask=None, dropout_p=0.0, softmax_scale=None, dropout_mask=None):
    """Bidirectional softmax attention with a key-padding mask.

    q, k, v: [B, H, L, D]. attention_mask: [B, L], 1/True = real token. Padded keys get zero probability;
    a query row with no real key, and every padded query row, returns zeros. ``dropout_mask`` ([B, H, L, L]
    bool, True = kept) replaces the random draw so tests can replay a kernel's mask.
    """
    if isinstance(attention_mask, tuple):  # a PreparedMask (kernels/attention.py): its first field is the mask
        attention_mask = attention_mask[0]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if attention_mask is not None:
        keep = attention_mask.bool()
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        has_key = keep.any(dim=-1)[:, None, None, None]
        # A fully masked row would softmax to NaN: give it finite scores, then zero it.
        scores = torch.where(has_key, scores, torch.zeros_like(scores))
        probs = torch.softmax(scores, dim=-1) * has_key
    else:
        probs = torch.softmax(scores, dim=-1)
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p, training=True)
    out = torch.matmul(probs, v.float())
    if attention_mask is not None:
        out = out * attention_mask.bool()[:, None, :, None]
    return out.to(q.dtype)


def attention_packed(qkv, attention_mask=None, dropout_p=0.0, softmax_scale=None, dropout_mask=None):
    """attention() on a fused projection qkv [B, L, 3, H, D]."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return attention(q, k, v, attention_mask, dropout_p=dropout_p, softmax_scale=softmax_scale,
                     dropout_mask=dropout_mask)


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None):
    """attention() applied to each sequence of a packed batch; q, k, v: [total_tokens, H, D].

    The sequences are gathered into a right-padded [B, H, max_seqlen, D] batch with a key mask and scattered
    back, with index arithmetic on the device only (no host read of ``cu_seqlens``, so it traces under
    torch.compile without a graph break). ``max_seqlen`` must be at least the longest sequence (the public
    ``attention_varlen`` checks it)."""
    total = q.shape[0]
    cu = cu_seqlens.to(device=q.device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]                                               # [B]
    pos = torch.arange(int(max_seqlen), device=q.device)
    mask = pos[None, :] < lengths[:, None]                                   # [B, L]
    # Padding positions read an appended zero row (index total), so an empty batch needs no branch either.
    gather = (cu[:-1, None] + pos[None, :]).clamp(max=total)
    padded = [torch.cat([t, t.new_zeros(1, *t.shape[1:])])[gather].transpose(1, 2) for t in (q, k, v)]
    o = attention(*padded, attention_mask=mask, dropout_p=dropout_p, softmax_scale=softmax_scale)
    # Token t of sequence b sits at row b * L + (t - cu[b]) of the padded output.
    tokens = torch.arange(total, device=q.device)
    seq = torch.searchsorted(cu[1:], tokens, right=True)
    rows = seq * int(max_seqlen) + (tokens - cu[seq])
    return o.transpose(1, 2).reshape(-1, *q.shape[1:]).index_select(0, rows)


def mlm_cross_entropy(hidden, weight, bias, labels, ignore_index=-100, return_num_correct=False):
    """Mean cross-entropy of ``hidden @ weight.T + bias`` over the rows whose label != ignore_index.

    Logits and the softmax are computed in fp32. With no labelled row the loss is 0 with zero gradients.
    With ``return_num_correct`` also returns the number of labelled rows whose argmax is the label.
    """
    valid = labels != ignore_index
    rows = valid.nonzero().squeeze(-1)
    h = hidden.index_select(0, rows).float()
    logits = F.linear(h, weight.float(), bias.float() if bias is not None else None)
    tgt = labels.index_select(0, rows).long()
    # The sum over the labelled rows over their count (at least 1): no branch on the count, so the definition
    # traces under torch.compile; with no labelled row the sum of nothing is 0 and every input, still in the
    # graph through the (empty) logits, gets a zero gradient.
    loss = F.cross_entropy(logits, tgt, reduction="sum") / valid.sum().clamp(min=1)
    if return_num_correct:
        num_correct = (logits.argmax(dim=-1) == tgt).sum()
        return loss, num_correct
    return loss


def gelu_backward_bias_grad(dact, pre):
    """(dpre, dbias): dpre = dact * GELU'(pre) (aten's exact-GELU backward, in pre's dtype) and dbias = the
    column sums of dpre in fp32, for [rows, n] dact and pre."""
    dpre = torch.ops.aten.gelu_backward(dact, pre)
    return dpre, dpre.sum(0, dtype=torch.float32)


def linear_gelu(x, w, b):
    """(pre, act) = (x W^T + b, GELU(pre)) for x [rows, k], w [n, k], b [n]: cuBLAS, then aten's erf GELU."""
    pre = F.linear(x, w, b)
    return pre, F.gelu(pre)


def dgrad_gelu_bias_grad(dout, w, pre):
    """(dpre, dbias) for out = GELU(pre) W^T: dpre = (dout W) * GELU'(pre) in pre's dtype, dbias = its column
    sums in fp32. dout [rows, e], w [e, n], pre [rows, n]."""
    return gelu_backward_bias_grad(dout @ w, pre)
