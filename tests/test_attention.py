"""Flash attention (fastroberta/kernels/attention.py) against the eager reference: outputs and q/k/v gradients for padded,
holed and absent masks, strided inputs, the varlen form, dropout (replayed through the reference), input
errors, and the model wired to it. On CPU the kernels run under Triton's interpreter, so shapes stay small."""
import importlib
import math
import os

import pytest
import torch

from fastroberta import RobertaConfig, RobertaForMaskedLM
from fastroberta.kernels import (PreparedMask, attention, attention_packed, attention_varlen, prepare_mask,
                                 reference)
from fastroberta.kernels._compile_options import COMPILE_OPTIONS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter cannot run bf16 (it computes on the raw bits); a GPU run covers it.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
OUT_TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=5e-3),
           torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
GRAD_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-3), torch.float16: dict(atol=1e-2, rtol=1e-2),
            torch.bfloat16: dict(atol=6e-2, rtol=5e-2)}
if DEVICE == "cuda":
    # fp32 attention multiplies in exact fp32 unless torch allows TF32 (attention.fp32_dot_precision; TF32 has
    # its own tests below); the GPU's exp2 is an approximation (2 ulp) and its FMAs sum in another order.
    OUT_TOL[torch.float32] = dict(atol=1e-4, rtol=1e-4)


def make_qkv(b, h, l, d, dtype, layout="contiguous", scale=1.0):
    """Leaf q, k, v [B, H, L, D]; "fused" are the model's strided views of one [B, L, 3, H, D] projection,
    "blhd" are [B, L, H, D] tensors seen through a transpose."""
    if layout == "fused":
        qkv = torch.randn(b, l, 3, h, d, device=DEVICE) * scale
        views = qkv.to(dtype).permute(2, 0, 3, 1, 4).unbind(0)
    elif layout == "blhd":
        views = [(torch.randn(b, l, h, d, device=DEVICE) * scale).to(dtype).transpose(1, 2) for _ in range(3)]
    else:
        views = [(torch.randn(b, h, l, d, device=DEVICE) * scale).to(dtype) for _ in range(3)]
    return [t.detach().requires_grad_() for t in views]


def make_mask(kind, b, l, dtype=torch.bool):
    """"right": random per-row lengths, the last row fully padded when b > 1; "holes": any 0/1 pattern,
    first row without a single real token when b > 1."""
    if kind == "none":
        return None
    if kind == "right":
        lengths = torch.randint(1, l + 1, (b,))
        if b > 1:
            lengths[-1] = 0
        else:
            lengths[0] = max(1, 2 * l // 3)
        mask = torch.arange(l)[None, :] < lengths[:, None]
    else:
        mask = torch.rand(b, l) > 0.4
        if b > 1:
            mask[0] = False
    return mask.to(dtype).to(DEVICE)


def run_and_compare(q, k, v, mask, softmax_scale=None):
    dtype = q.dtype
    o = attention(q, k, v, mask, softmax_scale=softmax_scale)
    assert o.shape == q.shape and o.dtype == dtype
    do = torch.randn(o.shape, device=DEVICE).to(dtype)
    o.backward(do)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ro = reference.attention(*ref_in, mask, softmax_scale=softmax_scale)
    ro.backward(do.float())
    torch.testing.assert_close(o.float(), ro, **OUT_TOL[dtype])
    for name, got, ref in zip("qkv", (q, k, v), ref_in):
        assert torch.isfinite(got.grad).all(), f"d{name} has non-finite values"
        torch.testing.assert_close(got.grad.float(), ref.grad, **GRAD_TOL[dtype], msg=lambda m: f"d{name}: {m}")
    if mask is not None:
        pad = ~mask.bool()
        # Padded queries output exact zeros and get zero dq; padded keys get zero dk, dv.
        assert (o.detach().transpose(1, 2)[pad] == 0).all()
        for t in (q, k, v):
            assert (t.grad.transpose(1, 2)[pad] == 0).all()
    return o


# (B, L, D, dtype, mask kind, layout): every B, L, D and mask kind in both dtypes, without the full product.
CASES = [
    (1, 16, 32, torch.float32, "none", "fused"),
    (3, 16, 64, torch.float16, "holes", "contiguous"),
    (3, 37, 32, torch.float16, "right", "fused"),
    (1, 37, 64, torch.float32, "holes", "blhd"),
    (3, 100, 64, torch.float32, "right", "fused"),
    (1, 100, 32, torch.float16, "none", "blhd"),
    (3, 130, 32, torch.float32, "holes", "fused"),
    (1, 130, 64, torch.float16, "right", "contiguous"),
]


@pytest.mark.parametrize("b,l,d,dtype,mask_kind,layout", CASES)
def test_matches_reference(b, l, d, dtype, mask_kind, layout):
    q, k, v = make_qkv(b, 2, l, d, dtype, layout)
    mask_dtype = {"none": torch.bool, "right": torch.long, "holes": torch.bool}[mask_kind]
    run_and_compare(q, k, v, make_mask(mask_kind, b, l, mask_dtype))


# Head dim 128 and long rows (many key blocks, a partial last one): on a GPU at real lengths in fp16 and bf16; the
# CPU twin runs the same test at lengths the interpreter manages, in fp16.
LONG = [(128, 1000), (64, 4100)] if DEVICE == "cuda" else [(128, 40), (64, 100)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16])
@pytest.mark.parametrize("d,l", LONG)
def test_matches_reference_long(dtype, d, l):
    q, k, v = make_qkv(2, 2, l, d, dtype, "fused")
    run_and_compare(q, k, v, make_mask("holes", 2, l))


def test_custom_scale_int_mask_and_large_scores():
    # Scores of magnitude ~100 would overflow a naive exp; the online softmax keeps them finite. fp32 here is
    # exact fp32 (torch's default matmul precision); under TF32 see test_tf32_attention_meets_its_tolerance.
    q, k, v = make_qkv(2, 2, 37, 16, torch.float32, "fused", scale=3.0)
    mask = make_mask("right", 2, 37, torch.int32)
    run_and_compare(q, k, v, mask, softmax_scale=0.9)


# ---------------------------------------------------------------------------------------------------------
# fp32 under TF32: torch's switch decides (attention.fp32_dot_precision)
# ---------------------------------------------------------------------------------------------------------
def tf32_tolerance(q, k, softmax_scale):
    """Largest error TF32 dots may give, relative to the largest reference value of the tensor compared: a
    10-bit mantissa (2**-10 relative per operand) on scores whose rounding error grows with their magnitude
    (an absolute error of |s| * 2**-10 in a score is that relative error in its probability)."""
    scores = (q.detach().float() @ k.detach().float().transpose(-1, -2)).abs().max().item() * softmax_scale
    return 2.0 ** -10 * (4 + scores / 4)


def to_tf32(t, rounding):
    """``t`` (fp32) with its mantissa cut to TF32's 10 bits: by truncation (dropping the low 13 bits, the worse
    case) or to nearest with ties away from zero (cvt.rna.tf32.f32)."""
    bits = t.contiguous().view(torch.int32)
    if rounding == "nearest":
        bits = bits + 0x1000
    return (bits & -0x2000).view(torch.float32)


class Tf32Matmul(torch.autograd.Function):
    """a @ b with both operands rounded to TF32, and so the two products of its backward: what a kernel's dots
    do in TF32 (fp32 accumulation)."""

    @staticmethod
    def forward(ctx, a, b, rounding):
        ctx.save_for_backward(a, b)
        ctx.rounding = rounding
        return to_tf32(a, rounding) @ to_tf32(b, rounding)

    @staticmethod
    def backward(ctx, grad):
        a, b = (to_tf32(t, ctx.rounding) for t in ctx.saved_tensors)
        grad = to_tf32(grad, ctx.rounding)
        return grad @ b.transpose(-1, -2), a.transpose(-1, -2) @ grad, None


def large_score_case(seed):
    torch.manual_seed(seed)
    q, k, v = make_qkv(2, 2, 37, 16, torch.float32, "fused", scale=3.0)
    return q, k, v, make_mask("right", 2, 37, torch.int32), torch.randn(2, 2, 37, 16, device=DEVICE)


def attention_and_grads(fn, q, k, v, mask, do, softmax_scale):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = fn(*leaves, mask, softmax_scale=softmax_scale)
    o.backward(do)
    return [o.detach()] + [t.grad for t in leaves]


def max_relative_errors(got, want):
    """Largest error of each tensor relative to its largest reference value (saturated softmax rows can make
    a whole gradient zero: then any error counts against 1e-30)."""
    return {name: ((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
            for name, g, w in zip(("o", "dq", "dk", "dv"), got, want)}


@pytest.mark.parametrize("rounding", ["truncate", "nearest"])
def test_tf32_emulation_meets_the_tf32_tolerance(monkeypatch, rounding):
    """A CPU test of the TF32 tolerance: the reference with every product's operands rounded to TF32 (forward
    and backward) stays within ``tf32_tolerance`` on large scores, where the exact-fp32 tolerance fails."""
    exact_failures = 0
    for seed in range(6):
        q, k, v, mask, do = large_score_case(seed)
        exact = attention_and_grads(reference.attention, q, k, v, mask, do, 0.9)
        with monkeypatch.context() as m:
            m.setattr(torch, "matmul", lambda a, b: Tf32Matmul.apply(a, b, rounding))
            emulated = attention_and_grads(reference.attention, q, k, v, mask, do, 0.9)
        errors = max_relative_errors(emulated, exact)
        tol = tf32_tolerance(q, k, 0.9)
        assert all(e <= tol for e in errors.values()), f"seed {seed}: {errors} above {tol:.3g}"
        exact_failures += not torch.allclose(emulated[0], exact[0], **OUT_TOL[torch.float32])
    assert exact_failures >= 3, "TF32 rounding should break the exact-fp32 tolerance at these scores"


@pytest.fixture
def allow_tf32():
    """Sets torch's TF32 switch for fp32 matmuls (the legacy flag: reading it still works afterwards, which
    setting torch >= 2.9's fp32_precision would break) and restores it."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32

    def set_(value):
        matmul.allow_tf32 = value
    yield set_
    matmul.allow_tf32 = saved


def test_tf32_attention_meets_its_tolerance(allow_tf32):
    """fp32 attention with TF32 allowed (on a GPU its dots run in TF32; the interpreter's stay exact), against
    the reference in exact fp32 (TF32 off while it runs: on a GPU its matmuls would follow the switch too)."""
    attn = importlib.import_module("fastroberta.kernels.attention")
    for seed in range(2):
        q, k, v, mask, do = large_score_case(seed)
        allow_tf32(False)
        want = attention_and_grads(reference.attention, q, k, v, mask, do, 0.9)
        allow_tf32(True)
        assert attn.fp32_dot_precision() == "tf32"
        got = attention_and_grads(attention, q, k, v, mask, do, 0.9)
        errors = max_relative_errors(got, want)
        assert all(e <= tf32_tolerance(q, k, 0.9) for e in errors.values()), errors


def test_fp32_dot_precision_follows_torch(allow_tf32):
    """fp32 attention multiplies in TF32 exactly when torch allows TF32 for fp32 matmuls (torch's default:
    it does not); fp16 launches carry one constant whatever the setting (no extra compiled variants)."""
    attn = importlib.import_module("fastroberta.kernels.attention")
    q = torch.zeros(1, 2, 8, 16)

    def precision(dtype):
        return attn._launch_meta(q.to(dtype), None, None, None, 8, 0.0, 0.25, None)["PRECISION"]
    for allow, expected in ((False, "ieee"), (True, "tf32")):
        allow_tf32(allow)
        assert attn.fp32_dot_precision() == expected and precision(torch.float32) == expected
        assert precision(torch.float16) == "tf32"
    allow_tf32(False)
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # torch's other spelling of the same switch
        assert attn.fp32_dot_precision() == "tf32"
    finally:
        torch.set_float32_matmul_precision(saved)


def test_all_padding_gives_zeros_not_nan():
    q, k, v = make_qkv(2, 2, 20, 16, torch.float16)
    mask = torch.zeros(2, 20, dtype=torch.uint8, device=DEVICE)
    o = attention(q, k, v, mask)
    o.float().sum().backward()
    assert (o == 0).all()
    for t in (q, k, v):
        assert (t.grad == 0).all()


def packed_batch(lengths, h, d, dtype, pad_value=30.0):
    """Packed q, k, v [total, H, D] (strided views of one [total, 3, H, D] tensor) and the same tokens
    right-padded to [B, H, L, D] views with loud garbage in the padding, plus the mask and cu_seqlens."""
    total, b, l = sum(lengths), len(lengths), max(lengths)
    packed = torch.randn(total, 3, h, d, device=DEVICE)
    mask = (torch.arange(l)[None, :] < torch.tensor(lengths)[:, None]).to(DEVICE)
    padded = torch.full((b, l, 3, h, d), pad_value, device=DEVICE)
    padded[mask] = packed
    varlen_in = [t.detach().requires_grad_() for t in packed.to(dtype).unbind(1)]
    padded_in = [t.detach().requires_grad_() for t in padded.to(dtype).permute(2, 0, 3, 1, 4).unbind(0)]
    cu = torch.zeros(b + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return varlen_in, padded_in, mask, cu.to(DEVICE)


@pytest.mark.parametrize("dtype,extra_len", [(torch.float32, 0), (torch.float16, 7)])
def test_varlen_matches_padded_and_reference(dtype, extra_len):
    lengths = [37, 0, 64, 5]
    (q, k, v), (qp, kp, vp), mask, cu = packed_batch(lengths, 2, 32, dtype)
    o = attention_varlen(q, k, v, cu, max(lengths) + extra_len)
    op = attention(qp, kp, vp, mask)
    do = torch.randn(o.shape, device=DEVICE).to(dtype)
    o.backward(do)
    dop = torch.zeros_like(op).transpose(1, 2)
    dop[mask] = do
    op.backward(dop.transpose(1, 2))
    # Same kernels on the same tokens: the two forms agree to rounding.
    torch.testing.assert_close(o, op.transpose(1, 2)[mask], atol=1e-6, rtol=1e-5)
    for t, tp in ((q, qp), (k, kp), (v, vp)):
        torch.testing.assert_close(t.grad, tp.grad.transpose(1, 2)[mask], atol=1e-5, rtol=1e-4)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ro = reference.attention_varlen(*ref_in, cu, max(lengths))
    ro.backward(do.float())
    torch.testing.assert_close(o.float(), ro, **OUT_TOL[dtype])
    for t, r in zip((q, k, v), ref_in):
        torch.testing.assert_close(t.grad.float(), r.grad, **GRAD_TOL[dtype])


def test_reference_varlen_is_attention_per_sequence():
    """The eager varlen definition (a gather into a padded batch, so it traces under torch.compile) equals
    reference.attention run on each sequence alone: empty sequences, a max_seqlen above the longest, an
    empty batch; outputs and gradients."""
    g = torch.Generator().manual_seed(3)
    for lengths, max_seqlen in (([5, 0, 9, 1, 0], 9), ([4, 7], 12), ([0, 0], 3)):
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        q, k, v = (torch.randn(int(cu[-1]), 2, 16, generator=g).requires_grad_() for _ in range(3))
        out = reference.attention_varlen(q, k, v, cu, max_seqlen)
        assert out.shape == q.shape
        parts = []
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if end > start:
                seq = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
                parts.append(reference.attention(*seq).squeeze(0).transpose(0, 1))
        expected = torch.cat(parts) if parts else torch.empty_like(q)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
        if q.shape[0]:
            w = torch.randn(q.shape, generator=g)
            grads = torch.autograd.grad((out * w).sum(), (q, k, v))
            expected_grads = torch.autograd.grad((expected * w).sum(), (q, k, v))
            for a, b in zip(grads, expected_grads):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------
def recover_keep_mask(mask, b, h, l, d, p, seed):
    """The kernel's dropout keep mask [B, H, L, L] for torch seed ``seed``: with q = k = 0 every real key gets
    probability 1/n, and one-hot values (d keys at a time) copy P_ij Z_ij / (1 - p) into o[i, j]. Entries of
    padded keys or queries come out False; P is 0 there, so any mask replays the same."""
    q = torch.zeros(b, h, l, d, device=DEVICE)
    keep = torch.zeros(b, h, l, l, dtype=torch.bool, device=DEVICE)
    for c in range(0, l, d):
        n = min(d, l - c)
        v = torch.zeros(b, h, l, d, device=DEVICE)
        v[:, :, c:c + n, :n] = torch.eye(n, device=DEVICE)
        torch.manual_seed(seed)
        keep[..., c:c + n] = attention(q, q, v, mask, dropout_p=p)[..., :n] != 0
    return keep


def test_dropout_seed_determinism_and_kept_fraction():
    b, h, l, d, p = 2, 2, 40, 32, 0.25
    mask = make_mask("right", b, l)
    mask[0] = True
    q, k, v = make_qkv(b, h, l, d, torch.float32)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(attention(q, k, v, mask, dropout_p=p))
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])

    keep = recover_keep_mask(mask, b, h, l, d, p, seed=3)
    real = (mask[:, None, :, None] & mask[:, None, None, :]).expand(b, h, l, l)
    frac = keep[real].float().mean().item()
    assert abs(frac - (1 - p)) < 0.03, frac
    # Heads and sequences draw from different Philox streams.
    assert not torch.equal(keep[0, 0], keep[0, 1])
    assert not torch.equal(keep[0, 0, :20, :20], keep[1, 0, :20, :20])
    # The recovered mask replays the kernel's forward exactly through the reference.
    ref = reference.attention(q.detach(), k.detach(), v.detach(), mask, dropout_p=p, dropout_mask=keep)
    torch.testing.assert_close(outs[0].detach(), ref, **OUT_TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_gradients_match_replayed_reference(dtype):
    b, h, l, d, p = 2, 2, 37, 32, 0.2
    mask = make_mask("holes", b, l)  # row 0 fully padded: no NaN under dropout either
    keep = recover_keep_mask(mask, b, h, l, d, p, seed=11)
    q, k, v = make_qkv(b, h, l, d, dtype, "fused")
    torch.manual_seed(11)
    o = attention(q, k, v, mask, dropout_p=p)
    do = torch.randn(o.shape, device=DEVICE).to(dtype)
    o.backward(do)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ro = reference.attention(*ref_in, mask, dropout_p=p, dropout_mask=keep)
    ro.backward(do.float())
    torch.testing.assert_close(o.float(), ro, **OUT_TOL[dtype])
    for t, r in zip((q, k, v), ref_in):
        assert torch.isfinite(t.grad).all()
        torch.testing.assert_close(t.grad.float(), r.grad, **GRAD_TOL[dtype])


def test_dropout_varlen_drops_the_same_entries_as_padded():
    lengths = [20, 33, 0]
    (q, k, v), (qp, kp, vp), mask, cu = packed_batch(lengths, 2, 16, torch.float32)
    torch.manual_seed(5)
    o = attention_varlen(q, k, v, cu, max(lengths), dropout_p=0.3)
    torch.manual_seed(5)
    op = attention(qp, kp, vp, mask, dropout_p=0.3)
    torch.testing.assert_close(o, op.transpose(1, 2)[mask], atol=1e-6, rtol=1e-5)
    do = torch.randn_like(o)
    o.backward(do)
    dop = torch.zeros_like(op).transpose(1, 2)
    dop[mask] = do
    op.backward(dop.transpose(1, 2))
    for t, tp in ((q, qp), (k, kp), (v, vp)):
        torch.testing.assert_close(t.grad, tp.grad.transpose(1, 2)[mask], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Input errors
# ---------------------------------------------------------------------------------------------------------
def _x(*shape, dtype=torch.float16, device=DEVICE):
    return torch.zeros(*shape, dtype=dtype, device=device)


PADDED_ERRORS = [
    (lambda: attention([1.0], _x(1, 2, 8, 16), _x(1, 2, 8, 16)), TypeError, "q must be a torch.Tensor"),
    (lambda: attention(_x(2, 8, 16), _x(2, 8, 16), _x(2, 8, 16)), ValueError, "q must have 4 dimensions"),
    (lambda: attention(_x(1, 2, 8, 16), _x(1, 2, 9, 16), _x(1, 2, 8, 16)), ValueError, "same shape"),
    (lambda: attention(_x(1, 2, 8, 16), _x(1, 2, 8, 16, dtype=torch.float32), _x(1, 2, 8, 16)), TypeError,
     "share a dtype"),
    (lambda: attention(*[_x(1, 2, 8, 16, dtype=torch.int32)] * 3), TypeError, "q has dtype int32"),
    (lambda: attention(*[_x(1, 2, 8, 48)] * 3), ValueError, "head dim 48"),
    (lambda: attention(_x(1, 2, 8, 16), _x(1, 2, 8, 16, device="meta"), _x(1, 2, 8, 16)), ValueError,
     "k is on meta"),
    (lambda: attention(*[_x(2, 2, 8, 16)] * 3, attention_mask=_x(2, 9, dtype=torch.bool)), ValueError,
     r"attention_mask must have shape \[B, L\]"),
    (lambda: attention(*[_x(2, 2, 8, 16)] * 3, attention_mask=_x(2, 8)), TypeError, "bool or integer"),
    (lambda: attention(*[_x(2, 2, 8, 16)] * 3, attention_mask=[[1] * 8] * 2), TypeError,
     "attention_mask must be a torch.Tensor"),
    (lambda: attention(*[_x(2, 2, 8, 16)] * 3, attention_mask=_x(2, 8, dtype=torch.bool, device="meta")),
     ValueError, "attention_mask is on meta"),
    (lambda: attention(*[_x(1, 2, 8, 16)] * 3, dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (lambda: attention(*[_x(1, 2, 8, 16)] * 3, dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    (lambda: attention(*[_x(1, 2, 8, 16)] * 3, dropout_p="0.1"), TypeError, "dropout_p must be a float"),
    (lambda: attention(*[_x(1, 2, 8, 16)] * 3, softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (lambda: attention(*[_x(1, 1, 32769, 16)] * 3, dropout_p=0.1), ValueError, "at most 32768 tokens"),
]


def _cu(*values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


VARLEN_ERRORS = [
    (lambda: attention_varlen(*[_x(1, 10, 2, 16)] * 3, _cu(0, 10), 10), ValueError, "q must have 3 dimensions"),
    (lambda: attention_varlen(*[_x(10, 2, 16)] * 3, _cu(0, 10, dtype=torch.int64), 10), TypeError,
     "cu_seqlens must be int32"),
    (lambda: attention_varlen(*[_x(10, 2, 16)] * 3, [0, 10], 10), TypeError, "cu_seqlens must be a torch.Tensor"),
    (lambda: attention_varlen(*[_x(10, 2, 16)] * 3, _cu(0, 10)[None], 10), ValueError, "1-D"),
    (lambda: attention_varlen(*[_x(10, 2, 16)] * 3, _cu(0), 10), ValueError, "1-D"),
    (lambda: attention_varlen(*[_x(10, 2, 16)] * 3, _cu(1, 10), 10), ValueError, "start at 0"),
    (lambda: attention_varlen(*[_x(10, 2, 16)] * 3, _cu(0, 6, 4, 10), 10), ValueError, "non-decreasing"),
    (lambda: attention_varlen(*[_x(10, 2, 16)] * 3, _cu(0, 4, 9), 10), ValueError, "ends at 9"),
    (lambda: attention_varlen(*[_x(10, 2, 16)] * 3, _cu(0, 4, 10), 5), ValueError, "max_seqlen=5"),
    (lambda: attention_varlen(*[_x(10, 2, 16)] * 3, _cu(0, 4, 10), torch.tensor(6)), TypeError,
     "max_seqlen must be an int"),
    (lambda: attention_varlen(*[_x(10, 2, 16)] * 3, _cu(0, 10).to("meta"), 10), ValueError,
     "cu_seqlens is on meta"),
    (lambda: attention_varlen(*[_x(10, 2, 24)] * 3, _cu(0, 10), 10), ValueError, "head dim 24"),
]


@pytest.mark.parametrize("call,exc,match", PADDED_ERRORS + VARLEN_ERRORS)
def test_input_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------
# The model on the kernel
# ---------------------------------------------------------------------------------------------------------
def tiny_batch(vocab=100, lengths=(20, 13), seed=0):
    g = torch.Generator().manual_seed(seed)
    b, l = len(lengths), max(lengths)
    ids = torch.full((b, l), 1, dtype=torch.long)
    mask = torch.zeros(b, l, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, :n] = 1
    labels = torch.where((torch.rand(b, l, generator=g) < 0.4) & mask.bool(), ids, torch.full_like(ids, -100))
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def tiny_models(attention_dropout, kernels=("torch", "triton")):
    cfg = RobertaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=40, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=attention_dropout)
    torch.manual_seed(0)
    first = RobertaForMaskedLM(cfg, kernels=kernels[0]).to(DEVICE)
    second = RobertaForMaskedLM(cfg, kernels=kernels[1]).to(DEVICE)
    second.load_state_dict(first.state_dict())
    return first.train(), second.train()


def loss_and_grads(model, batch, seed=0):
    torch.manual_seed(seed)
    ids, mask, labels = batch
    loss = model(ids, attention_mask=mask, labels=labels).loss
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_model_triton_matches_torch():
    eager, fused = tiny_models(attention_dropout=0.0)
    batch = tiny_batch()
    loss_e, grads_e = loss_and_grads(eager, batch)
    loss_f, grads_f = loss_and_grads(fused, batch)
    torch.testing.assert_close(loss_f, loss_e, atol=1e-5, rtol=1e-5)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_f[name], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_model_unpadded_attention_matches_padded():
    # The packing plumbing on the eager ops; the Triton ops get the same check, with dropout, below.
    padded, packed = tiny_models(attention_dropout=0.0, kernels=("torch", "torch"))
    packed.unpad = True
    batch = tiny_batch(lengths=(20, 0, 7))
    loss_p, grads_p = loss_and_grads(padded, batch)
    loss_u, grads_u = loss_and_grads(packed, batch)
    torch.testing.assert_close(loss_u, loss_p, atol=1e-5, rtol=1e-5)
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_u[name], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_model_unpadded_attention_replays_padded_dropout():
    # Right-padded rows: the packed kernel keys Philox by in-sequence positions, so it drops what the padded
    # kernel drops, and a training step with attention dropout is the same step either way. (Hidden dropout
    # stays off: it is the LayerNorm kernel's business and slow under the interpreter.)
    padded, packed = tiny_models(attention_dropout=0.1, kernels=("triton", "triton"))
    packed.unpad = True
    batch = tiny_batch()
    loss_p, grads_p = loss_and_grads(padded, batch, seed=7)
    loss_u, grads_u = loss_and_grads(packed, batch, seed=7)
    torch.testing.assert_close(loss_u, loss_p, atol=1e-5, rtol=1e-5)
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_u[name], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    loss_other, _ = loss_and_grads(packed, batch, seed=8)
    assert not torch.allclose(loss_other, loss_u)


# ---------------------------------------------------------------------------------------------------------
# Packed QKV: one [B, L, 3, H, D] input, one gradient
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["none", "right", "holes"])
def test_packed_qkv_matches_reference(dtype, kind):
    b, l, h, d = 2, 37, 2, 32
    qkv = (torch.randn(b, l, 3, h, d, device=DEVICE) * 0.5).to(dtype).requires_grad_()
    mask = make_mask(kind, b, l)
    o = attention_packed(qkv, mask)
    assert o.shape == (b, h, l, d) and o.dtype == dtype
    do = torch.randn_like(o)
    o.backward(do)
    ref_qkv = qkv.detach().float().requires_grad_()
    ro = reference.attention_packed(ref_qkv, mask)
    ro.backward(do.float())
    torch.testing.assert_close(o.float(), ro, **OUT_TOL[dtype])
    assert qkv.grad.shape == qkv.shape and qkv.grad.is_contiguous()
    torch.testing.assert_close(qkv.grad.float(), ref_qkv.grad, **GRAD_TOL[dtype])


def test_packed_qkv_with_dropout_equals_the_unbound_views():
    b, l, h, d, p = 2, 40, 2, 16, 0.3
    qkv = torch.randn(b, l, 3, h, d, device=DEVICE, requires_grad=True)
    mask = make_mask("right", b, l)
    torch.manual_seed(11)
    o = attention_packed(qkv, mask, dropout_p=p)
    o.sum().backward()
    views = qkv.detach().clone().requires_grad_()
    torch.manual_seed(11)
    o2 = attention(*views.permute(2, 0, 3, 1, 4).unbind(0), mask, dropout_p=p)
    o2.sum().backward()
    assert torch.equal(o, o2)
    assert torch.equal(qkv.grad, views.grad)


def test_packed_qkv_backward_makes_no_copy_of_the_gradient():
    """The [B, L, 3, H, D] gradient comes out of the kernels as is: torch.profiler sees no stack, cat or
    clone of that size, which unbinding qkv into q, k, v and differentiating through the views costs."""
    b, l, h, d = 2, 32, 2, 16
    numel = b * l * 3 * h * d

    def big_copies(fn):
        qkv = torch.randn(b, l, 3, h, d, device=DEVICE, requires_grad=True)
        o = fn(qkv)
        grad = torch.randn_like(o)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            o.backward(grad)
        found = []
        for evt in prof.events():
            # The profiler records no shapes for a list of tensors: any stack or cat counts. (Not copy_: the
            # interpreter copies every kernel argument to and from host buffers.)
            if evt.name in ("aten::stack", "aten::cat"):
                found.append(evt.name)
            elif evt.name == "aten::clone" and any(math.prod(s) >= numel // 3 for s in evt.input_shapes if s):
                found.append(evt.name)
        return found

    assert big_copies(lambda t: attention_packed(t)) == []
    # The check can fail: the unbound views do stack their gradients.
    assert big_copies(lambda t: attention(*t.permute(2, 0, 3, 1, 4).unbind(0)))


def test_packed_qkv_input_errors():
    with pytest.raises(ValueError, match=r"\[B, L, 3, H, D\]"):
        attention_packed(torch.randn(1, 4, 2, 2, 16))
    with pytest.raises(ValueError, match="must have 5 dimensions"):
        attention_packed(torch.randn(4, 3, 2, 16))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        attention_packed(torch.randn(1, 4, 3, 2, 16), torch.ones(1, 5, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["right", "holes"])
def test_a_prepared_mask_gives_what_the_mask_gives(kind):
    """prepare_mask (once per forward in the model) and the raw mask: the same outputs and gradients, bit for
    bit, with dropout, on both entry points and the eager path; and one call's launches fewer."""
    b, l, h, d, p = 3, 37, 2, 16, 0.2
    mask = make_mask(kind, b, l, dtype=torch.int64)
    prepared = prepare_mask(mask)
    assert isinstance(prepared, PreparedMask) and prepared.mask.dtype == torch.bool
    assert torch.equal(prepared.mask, mask.bool()) and prepare_mask(prepared) is prepared and prepare_mask(None) is None
    qkv = torch.randn(b, l, 3, h, d, device=DEVICE)
    results = []
    for m in (mask, prepared):
        for fn in (lambda t, m: attention_packed(t, m, dropout_p=p),
                   lambda t, m: attention(*t.permute(2, 0, 3, 1, 4).unbind(0), m, dropout_p=p),
                   lambda t, m: reference.attention_packed(t, m)):
            leaf = qkv.clone().requires_grad_()
            torch.manual_seed(5)
            out = fn(leaf, m)
            out.backward(torch.ones_like(out))
            results.append((out, leaf.grad))
    for (o1, g1), (o2, g2) in zip(results[:3], results[3:]):
        assert torch.equal(o1, o2) and torch.equal(g1, g2)

    def launches(m):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            attention_packed(qkv, m)
        return sum(evt.name in ("aten::amax", "aten::arange", "aten::where") for evt in prof.events())
    assert launches(prepared) == 0 < launches(mask)


def test_a_given_dropout_seed_fixes_the_mask_whatever_the_generator():
    """dropout_seed (a slice of one new_dropout_seeds draw, as the model hands each layer): the same seed gives
    the same dropped entries and gradients whatever torch's generator holds, another seed others, on all three
    entry points; a seed that is not a one-element int64 tensor on the inputs' device is one clear error."""
    from fastroberta.kernels._checks import new_dropout_seeds
    b, l, h, d, p = 2, 33, 2, 16, 0.3
    qkv = torch.randn(b, l, 3, h, d, device=DEVICE)
    mask = make_mask("right", b, l)
    pool = new_dropout_seeds(4, DEVICE)
    assert pool.dtype == torch.int64 and pool.shape == (4,) and pool.min() >= 0
    lengths = [l] * b
    cu = torch.tensor([0, l, 2 * l], dtype=torch.int32, device=DEVICE)
    calls = {"packed": lambda t, s: attention_packed(t, mask, dropout_p=p, dropout_seed=s),
             "views": lambda t, s: attention(*t.permute(2, 0, 3, 1, 4).unbind(0), mask, dropout_p=p, dropout_seed=s),
             "varlen": lambda t, s: attention_varlen(*t.reshape(b * l, 3, h, d).unbind(1), cu, max(lengths),
                                                     dropout_p=p, dropout_seed=s)}
    for name, fn in calls.items():
        runs = []
        for generator_seed, slot in ((1, 0), (2, 0), (1, 3)):
            torch.manual_seed(generator_seed)
            leaf = qkv.clone().requires_grad_()
            out = fn(leaf, pool[slot:slot + 1])
            out.backward(torch.ones_like(out))
            runs.append((out, leaf.grad))
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), name
        assert not torch.equal(runs[0][0], runs[2][0]), name
    with pytest.raises(TypeError, match=r"dropout_seed must be a one-element int64 tensor, got torch.int32"):
        attention_packed(qkv, mask, dropout_p=p, dropout_seed=pool[:1].int())
    with pytest.raises(TypeError, match=r"dropout_seed must be a one-element int64 tensor, got .*\(2,\)"):
        attention_packed(qkv, mask, dropout_p=p, dropout_seed=pool[:2])
    with pytest.raises(TypeError, match="dropout_seed must be a one-element int64 tensor, got int"):
        attention_packed(qkv, mask, dropout_p=p, dropout_seed=7)


def test_prepared_mask_errors():
    with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
        prepare_mask(torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, L\], got \(8,\)"):
        prepare_mask(torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, L\] = \(1, 4\), got \(1, 5\)"):
        attention_packed(torch.randn(1, 4, 3, 2, 16), prepare_mask(torch.ones(1, 5, dtype=torch.bool)))


def test_the_model_prepares_the_mask_once_for_all_its_layers():
    """Counted on meta (benchmarks/bench_model.py's training step, all-ones mask): a padded batch's mask
    bookkeeping (arange, amax, where) runs once per forward, not once per layer, on the Triton path."""
    import dataclasses
    from benchmarks import bench_model
    counts = {}
    for layers in (2, 4):
        cfg = dataclasses.replace(bench_model._configs("tiny"), num_hidden_layers=layers)
        counter, _ = bench_model.count_step("fastroberta", "mlm", cfg, 2, 16)
        counts[layers] = sum(r.op in ("amax", "arange", "where") for r in counter.records if r.phase == "forward")
    assert counts[2] == counts[4] > 0, counts


# ---------------------------------------------------------------------------------------------------------
# Right-padded rows: run on their lengths, no per-key mask
# ---------------------------------------------------------------------------------------------------------
def test_row_lengths_mark_rows_with_holes():
    attn = importlib.import_module("fastroberta.kernels.attention")
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    key_mask, seqlens = attn._mask_and_lengths(mask, 4, mask.device)
    assert seqlens.dtype == torch.int32 and seqlens.tolist() == [2, -3, 0, 4, -3]
    assert torch.equal(key_mask.bool(), mask)
    assert attn._mask_and_lengths(None, 4, mask.device) == (None, None)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_mixed_prefix_and_holed_rows(dropout_p):
    """One batch where some rows take the mask-free path (prefix masks) and others read the mask (holes): both
    paths in one launch, forward and backward, against the reference replaying the kernel's dropout mask."""
    b, h, l, d = 4, 2, 48, 16
    mask = torch.ones(b, l, dtype=torch.bool, device=DEVICE)
    mask[0, 30:] = False          # right-padded
    mask[1, 5:9] = False          # a hole, real tokens after it
    mask[2, 17:] = False          # right-padded, ends inside a block
    mask[3, ::3] = False          # many holes
    q, k, v = make_qkv(b, h, l, d, torch.float32)
    torch.manual_seed(5)
    o = attention(q, k, v, mask, dropout_p=dropout_p)
    do = torch.randn_like(o)
    o.backward(do)
    keep = recover_keep_mask(mask, b, h, l, d, dropout_p, seed=5) if dropout_p else None
    ref_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ro = reference.attention(*ref_in, mask, dropout_p=dropout_p, dropout_mask=keep)
    ro.backward(do)
    torch.testing.assert_close(o, ro, **OUT_TOL[torch.float32])
    for t, r in zip((q, k, v), ref_in):
        torch.testing.assert_close(t.grad, r.grad, **GRAD_TOL[torch.float32])


# ---------------------------------------------------------------------------------------------------------
# FASTROBERTA_AUTOTUNE=0: the default config, nothing benchmarked
# ---------------------------------------------------------------------------------------------------------
def test_autotune_off_launches_the_default_config_without_the_autotuner(monkeypatch):
    """With autotuning off a GPU launch still has one default per input class (three configs): Triton 3.6's
    autotuner would benchmark whatever survives pruning, even one config. ``_launch`` picks the default on the
    host and calls the jitted function; with autotuning on it hands the launch to the autotuner."""
    attn = importlib.import_module("fastroberta.kernels.attention")
    monkeypatch.setattr(attn, "interpreter_active", lambda: False)
    monkeypatch.setattr(attn, "AUTOTUNE", False)
    defaults = {"d64": (128, 64, 8, 3), "d128": (32, 128, 8, 3), "fp32": (64, 32, 4, 2)}
    launches = []

    class Launcher:  # kernel[grid](*args, **kwargs), recorded under ``name``
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, kwargs))

    class Autotuned(Launcher):
        configs = attn._configs((64, 32), defaults, [(16, 16, 2, 2)])
        arg_names = ["Q", "n"]
        fn = Launcher("jit")
    assert len(Autotuned.configs) == 3
    kernel = Autotuned("autotuner")
    for dtype, head_dim, kind in ((torch.float16, 64, "d64"), (torch.bfloat16, 128, "d128"),
                                  (torch.float32, 32, "fp32")):
        attn._launch(kernel, None, torch.zeros(1, dtype=dtype), 1, HEAD_DIM=head_dim)
        how, kwargs = launches[-1]
        assert how == "jit"
        assert (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["num_stages"]) == defaults[kind]
        assert kwargs["enable_fp_fusion"] is True
    monkeypatch.setattr(attn, "AUTOTUNE", True)
    attn._launch(kernel, None, torch.zeros(1, dtype=torch.float16), 1, HEAD_DIM=64)
    assert launches[-1] == ("autotuner", {"HEAD_DIM": 64, **COMPILE_OPTIONS})  # the pinned options on both paths


def test_autotune_off_is_read_from_the_environment():
    """FASTROBERTA_AUTOTUNE=0 on a GPU-like import (interpreter off): the defaults only, autotuning off."""
    import subprocess
    import sys
    code = ("import importlib; a = importlib.import_module('fastroberta.kernels.attention'); "
            "print(a.AUTOTUNE, len(a._attn_fwd.configs), len(a._attn_bwd_dkdv.configs), len(a._attn_bwd_dq.configs))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, TRITON_INTERPRET="0", FASTROBERTA_AUTOTUNE="0")).stdout.split()
    assert out == ["False", "3", "3", "3"]
