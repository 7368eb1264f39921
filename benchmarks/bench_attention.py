"""Bidirectional attention with a key-padding mask: fastroberta's flash kernels (padded and varlen) against eager
PyTorch, SDPA and flash-attn.

16K tokens per batch (B = 16384 / L), H = 12, D = 64, L = 128 and 512, padding 0% / 25% / 50% (random per-row
lengths, right-padded as HF does), attention dropout 0 and 0.1, fp16 and bf16. q, k and v are the strided
[B, H, L, D] views of one [B, L, 3, H, D] fused-QKV tensor, as the model passes them. Competitors:
    fastroberta         attention(q, k, v, mask, dropout_p)                      padded [B, H, L, D]
    fastroberta-varlen  attention_varlen(q, k, v, cu_seqlens, max_seqlen)       unpadded [tokens, H, D]
    eager               HF's eager attention: q kᵀ·scale + additive mask, softmax, dropout, · v
    sdpa-mask           F.scaled_dot_product_attention with the boolean key mask (memory-efficient backend)
    sdpa-nomask         SDPA without a mask: the flash backend, attending to the padding too (an upper bound)
    flash-attn          flash_attn_qkvpacked_func (no padding only) — when flash-attn is installed
    flash-attn-varlen   flash_attn_varlen_qkvpacked_func on the unpadded tokens — when installed

TFLOP/s counts real tokens only: forward 4·H·D·Σ lᵢ² (q kᵀ and p v), backward 2.5x that (five matmuls to two),
whatever a competitor spends on padding. The correctness check compares real query rows (padded rows are zero
in fastroberta and the reference, undefined in eager/SDPA) with the gradient of padded rows set to zero.
"""
import math
import sys

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.harness import Case, Competitor, Runner
from benchmarks.pytest_support import make_kernel_test
from fastroberta.kernels import attention, attention_varlen, reference

NAME = "attention"
TITLE = "Attention with key-padding mask (non-causal)"
METRIC = "TFLOP/s"
MODES = ("fwd", "bwd", "fwd+bwd")
BASELINE = "eager"
TOKENS = 16384


def cases(profile):
    if profile == "smoke":
        specs = [(2, 32, 2, 32, 0.25, 0.1, "fp16")]
    else:
        if profile == "check":
            grid = [(512, 0.0, 0.0, "fp16"), (512, 0.5, 0.0, "fp16"), (512, 0.25, 0.0, "fp16"),
                    (512, 0.0, 0.1, "fp16"), (128, 0.0, 0.0, "fp16"), (512, 0.0, 0.0, "bf16")]
        else:
            grid = [(seq, pad, p, dt) for dt in ("fp16", "bf16") for seq in (512, 128) for p in (0.0, 0.1)
                    for pad in (0.0, 0.25, 0.5)]
        specs = [(TOKENS // seq, seq, 12, 64, pad, p, dt) for seq, pad, p, dt in grid]
    return [Case.make(f"L{seq}-pad{round(pad * 100)}-p{p}-{dt}", batch=b, seqlen=seq, heads=h, head_dim=d,
                      pad=pad, dropout_p=p, dtype=dt) for b, seq, h, d, pad, p, dt in specs]


def seq_lengths(batch, seqlen, pad, seed=0):
    """Per-row real lengths averaging (1 - pad)·seqlen: l = seqlen·(1 - 2·pad·u), u ~ U(0, 1), at least 1."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(batch, generator=g)
    return (seqlen * (1 - 2 * pad * u)).round().clamp(1, seqlen).long()


def make_inputs(case, device):
    p = case.p
    b, l, h, d = p["batch"], p["seqlen"], p["heads"], p["head_dim"]
    g = torch.Generator().manual_seed(0)
    lengths = seq_lengths(b, l, p["pad"])
    mask = torch.arange(l)[None, :] < lengths[:, None]
    qkv = torch.randn(b, l, 3, h, d, generator=g).to(device=device, dtype=case.dtype)
    dout = (torch.randn(b, h, l, d, generator=g) * mask[:, None, :, None]).to(device=device, dtype=case.dtype)
    idx = mask.flatten().nonzero().squeeze(-1).to(device)
    cu_seqlens = torch.zeros(b + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    return {
        "qkv": qkv, "mask": mask.to(device), "dout": dout, "lengths": lengths,
        "qkv_unpad": qkv.reshape(b * l, 3, h, d).index_select(0, idx),
        "dout_unpad": dout.transpose(1, 2).reshape(b * l, h, d).index_select(0, idx),
        "cu_seqlens": cu_seqlens.to(device), "max_seqlen": int(lengths.max()),
    }


def work(case, inputs, mode):
    """FLOPs over real tokens (see the module docstring)."""
    p = case.p
    fwd = 4 * p["heads"] * p["head_dim"] * float((inputs["lengths"].double() ** 2).sum())
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def split(qkv):
    """[B, L, 3, H, D] -> three strided [B, H, L, D] views, as the model's fused QKV projection gives them."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _padded(case, inputs, fn, masked=True):
    mask = inputs["mask"]
    ref_mask = mask if masked else None
    return Runner(fn=fn, leaves=[inputs["qkv"].detach().clone().requires_grad_(True)], leaf_names=("qkv",),
                  ref_fn=lambda qkv: reference.attention(*split(qkv), ref_mask),
                  dout=inputs["dout"], compare_mask=mask[:, None, :, None])


def _unpadded_qkv(inputs):
    return [t.contiguous().requires_grad_(True) for t in inputs["qkv_unpad"].detach().unbind(1)]


def _varlen_ref(inputs):
    cu, max_len = inputs["cu_seqlens"], inputs["max_seqlen"]
    return lambda q, k, v: reference.attention_varlen(q, k, v, cu, max_len)


def build_fastroberta(case, inputs):
    mask, p = inputs["mask"], case.p["dropout_p"]
    return _padded(case, inputs, lambda qkv: attention(*split(qkv), attention_mask=mask, dropout_p=p))


def build_fastroberta_varlen(case, inputs):
    cu, max_len, p = inputs["cu_seqlens"], inputs["max_seqlen"], case.p["dropout_p"]
    return Runner(fn=lambda q, k, v: attention_varlen(q, k, v, cu, max_len, dropout_p=p),
                  leaves=_unpadded_qkv(inputs), leaf_names=("q", "k", "v"), ref_fn=_varlen_ref(inputs),
                  dout=inputs["dout_unpad"])


def build_eager(case, inputs):
    p = case.p["dropout_p"]
    dtype = case.dtype
    bias = (~inputs["mask"]).to(dtype)[:, None, None, :] * torch.finfo(dtype).min

    def fn(qkv):
        q, k, v = split(qkv)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1])) + bias
        probs = F.dropout(torch.softmax(scores, dim=-1), p, training=True)
        return torch.matmul(probs, v)
    return _padded(case, inputs, fn)


def build_sdpa_mask(case, inputs):
    p, keep = case.p["dropout_p"], inputs["mask"][:, None, None, :]
    return _padded(case, inputs, lambda qkv: F.scaled_dot_product_attention(*split(qkv), attn_mask=keep,
                                                                             dropout_p=p))


def build_sdpa_nomask(case, inputs):
    p = case.p["dropout_p"]
    return _padded(case, inputs, lambda qkv: F.scaled_dot_product_attention(*split(qkv), dropout_p=p),
                   masked=False)


def build_flash_attn(case, inputs):
    from flash_attn import flash_attn_qkvpacked_func

    p = case.p["dropout_p"]
    return _padded(case, inputs, lambda qkv: flash_attn_qkvpacked_func(qkv, dropout_p=p).transpose(1, 2),
                   masked=False)


def build_flash_attn_varlen(case, inputs):
    from flash_attn import flash_attn_varlen_qkvpacked_func

    cu, max_len, p = inputs["cu_seqlens"], inputs["max_seqlen"], case.p["dropout_p"]
    ref = _varlen_ref(inputs)
    return Runner(fn=lambda qkv: flash_attn_varlen_qkvpacked_func(qkv, cu, max_len, dropout_p=p),
                  leaves=[inputs["qkv_unpad"].detach().clone().requires_grad_(True)], leaf_names=("qkv",),
                  ref_fn=lambda qkv: ref(*qkv.unbind(1)), dout=inputs["dout_unpad"])


def competitors(smoke=False):
    flash = lambda: harness.import_status("flash_attn", "flash_attn_qkvpacked_func")  # noqa: E731
    return [
        Competitor("fastroberta", build_fastroberta, ours=True),
        Competitor("fastroberta-varlen", build_fastroberta_varlen, ours=True),
        Competitor("eager", build_eager),
        Competitor("sdpa-mask", build_sdpa_mask),
        Competitor("sdpa-nomask", build_sdpa_nomask),
        Competitor("flash-attn", build_flash_attn, status=flash, applies=lambda case: case.p["pad"] == 0),
        Competitor("flash-attn-varlen", build_flash_attn_varlen, status=flash),
    ]


# `pytest benchmarks/ --benchmark-only` collects this (benchmarks/conftest.py collects bench_*.py).
test_attention = make_kernel_test(sys.modules[__name__])
