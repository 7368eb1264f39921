"""The FFN's GEMMs with GELU epilogues (kernels/linear_gelu.py) against eager F.linear / F.gelu / aten's GELU
backward, and fused_linear.feed_forward_and_input against plain autograd: outputs and every gradient."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from fastroberta.fused_linear import feed_forward_and_input
from fastroberta.kernels import reference
from fastroberta.kernels.linear_gelu import dgrad_gelu_bias_grad, linear_gelu

lg = importlib.import_module("fastroberta.kernels.linear_gelu")
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=5e-3, rtol=5e-3)}
SHAPES = [(48, 32, 80), (37, 24, 53)]  # rows, k, n: several tiles each way, ragged in every dimension


def _randn(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_forward_matches_eager(dtype, m, k, n):
    g = torch.Generator().manual_seed(0)
    x, w, b = _randn(g, m, k, dtype=dtype), _randn(g, n, k, dtype=dtype, scale=0.3), _randn(g, n, dtype=dtype)
    pre, act = linear_gelu(x, w, b)
    want = F.linear(x.float(), w.float(), b.float())
    assert pre.dtype == act.dtype == dtype and pre.shape == act.shape == (m, n)
    torch.testing.assert_close(pre.float(), want, **TOL[dtype])
    torch.testing.assert_close(act.float(), F.gelu(want), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_dgrad_matches_eager(dtype, m, k, n):
    g = torch.Generator().manual_seed(1)
    dout, w, pre = _randn(g, m, k, dtype=dtype), _randn(g, k, n, dtype=dtype, scale=0.3), _randn(g, m, n,
                                                                                                  dtype=dtype, scale=2)
    dpre, db = dgrad_gelu_bias_grad(dout, w, pre)
    want = torch.ops.aten.gelu_backward(dout.float() @ w.float(), pre.float())
    assert dpre.dtype == dtype and db.dtype == torch.float32 and dpre.shape == (m, n) and db.shape == (n,)
    torch.testing.assert_close(dpre.float(), want, **TOL[dtype])
    torch.testing.assert_close(db, want.sum(0), atol=TOL[dtype]["atol"] * m ** 0.5, rtol=TOL[dtype]["rtol"])


def test_empty_rows_and_bad_input():
    pre, act = linear_gelu(torch.empty(0, 16), torch.empty(8, 16), torch.empty(8))
    assert pre.shape == act.shape == (0, 8)
    dpre, db = dgrad_gelu_bias_grad(torch.empty(0, 16), torch.empty(16, 8), torch.empty(0, 8))
    assert dpre.shape == (0, 8) and torch.equal(db, torch.zeros(8))
    with pytest.raises(ValueError, match="do not fit x W"):
        linear_gelu(torch.empty(3, 16), torch.empty(8, 15), torch.empty(8))
    with pytest.raises(ValueError, match="do not fit"):
        dgrad_gelu_bias_grad(torch.empty(3, 16), torch.empty(16, 8), torch.empty(3, 9))
    with pytest.raises(TypeError, match="w has dtype"):
        linear_gelu(torch.empty(3, 16), torch.empty(8, 16, dtype=torch.float16), torch.empty(8))


def test_costs_count_the_extra_output_and_input():
    x = torch.empty(1024, 768, dtype=torch.float16, device="meta")
    w1, b1 = torch.empty(3072, 768, dtype=torch.float16, device="meta"), torch.empty(3072, dtype=torch.float16,
                                                                                  device="meta")
    (fwd,) = lg._linear_gelu_cost(x, w1, b1)
    assert fwd.kind == "GEMM" and fwd.flops == 2 * 1024 * 3072 * 768
    assert fwd.read == 2 * (1024 * 768 + 3072 * 768 + 3072) and fwd.written == 2 * 2 * 1024 * 3072  # pre, act
    pre, w2 = torch.empty(1024, 3072, dtype=torch.float16, device="meta"), torch.empty(768, 3072,
                                                                                       dtype=torch.float16,
                                                                                       device="meta")
    dgrad, partial_sum = lg._dgrad_gelu_cost(x, w2, pre)
    bands = 1024 // lg.DGRAD_BLOCK_M
    assert dgrad.flops == 2 * 1024 * 3072 * 768
    assert dgrad.read == 2 * (1024 * 768 + 768 * 3072 + 1024 * 3072)  # dout, W2 and pre
    assert dgrad.written == 2 * 1024 * 3072 + bands * 3072 * 4  # dpre and the fp32 partial bias rows
    assert partial_sum.read == bands * 3072 * 4 and partial_sum.written == 3072 * 4


@pytest.mark.parametrize("kernels", ["triton", "torch"])
@pytest.mark.parametrize("second_bias", [True, False], ids=["b2", "no_b2"])
def test_feed_forward_with_residual_matches_autograd(kernels, second_bias):
    """(GELU(x W1^T + b1) W2^T + b2, x) with x also a residual: the fused backward (GELU's derivative in the
    dgrad GEMM, the residual's gradient added in the first linear's dgrad) gives plain autograd's gradients.
    Without b2 (the model adds it in the LayerNorm after the FFN) no b2 gradient is computed."""
    g = torch.Generator().manual_seed(2)
    e, i = 24, 53
    x = torch.randn(2, 9, e, generator=g, requires_grad=True)
    w1, b1 = (torch.randn(i, e, generator=g) * 0.3).requires_grad_(), torch.randn(i, generator=g).requires_grad_()
    w2, b2 = (torch.randn(e, i, generator=g) * 0.3).requires_grad_(), torch.randn(e, generator=g).requires_grad_()
    dy = torch.randn(2, 9, e, generator=g)
    if not second_bias:
        b2 = None
    params = (x, w1, b1, w2, b2)

    ops = (linear_gelu, dgrad_gelu_bias_grad) if kernels == "triton" else (reference.linear_gelu,
                                                                             reference.dgrad_gelu_bias_grad)
    out, xr = feed_forward_and_input(*params, *ops)
    got = out * 0.5 + xr * xr
    want = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2) * 0.5 + x * x
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    leaves = [t for t in params if t is not None]
    for a, e_ in zip(torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy)):
        torch.testing.assert_close(a, e_, atol=1e-4, rtol=1e-4)
