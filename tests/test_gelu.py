"""The fused GELU backward + bias gradient kernel against aten's GELU backward and a column sum, and
linear_and_input (the QKV projection's form) against plain autograd: outputs and every gradient."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from fastroberta.fused_linear import linear_and_input
from fastroberta.kernels import gelu_backward_bias_grad, reference

gelu_mod = importlib.import_module("fastroberta.kernels.gelu")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(5, 40), (600, 136)])  # ragged tiles; more than one band of rows
def test_kernel_matches_aten(dtype, shape):
    g = torch.Generator().manual_seed(0)
    pre = (torch.randn(shape, generator=g) * 3).to(dtype)
    dact = torch.randn(shape, generator=g).to(dtype)
    dpre, db = gelu_backward_bias_grad(dact, pre)
    want = torch.ops.aten.gelu_backward(dact.float(), pre.float())
    torch.testing.assert_close(dpre.float(), want, **TOL[dtype])
    assert dpre.dtype == dtype and db.dtype == torch.float32
    torch.testing.assert_close(db, want.sum(0), atol=1e-3 * shape[0] ** 0.5, rtol=1e-3)
    ref_dpre, ref_db = reference.gelu_backward_bias_grad(dact, pre)
    torch.testing.assert_close(dpre, ref_dpre, **TOL[dtype])


def test_empty_rows_and_bad_input():
    dpre, db = gelu_backward_bias_grad(torch.empty(0, 8), torch.empty(0, 8))
    assert dpre.shape == (0, 8) and torch.equal(db, torch.zeros(8))
    with pytest.raises(ValueError, match="dact has shape"):
        gelu_backward_bias_grad(torch.empty(3, 8), torch.empty(3, 9))
    with pytest.raises(TypeError, match="dact has dtype"):
        gelu_backward_bias_grad(torch.empty(3, 8, dtype=torch.float16), torch.empty(3, 8))


def test_cost_counts_one_read_of_each_input_and_one_write():
    pre = torch.empty(1024, 256, dtype=torch.float16, device="meta")
    fused, partial_sum = gelu_mod._gelu_backward_bias_grad_cost(pre, pre)
    assert fused.read == 2 * 2 * 1024 * 256
    assert fused.written == 2 * 1024 * 256 + 2 * 256 * 4  # dpre + two bands of fp32 partials
    assert partial_sum.read == 2 * 256 * 4 and partial_sum.written == 256 * 4


def test_linear_and_input_with_residual_matches_autograd():
    """x -> (x W^T + b, x) with x also a residual: the residual's gradient added in the dgrad GEMM gives plain
    autograd's gradients."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    w = torch.randn(48, 16, generator=g, requires_grad=True)
    b = torch.randn(48, generator=g, requires_grad=True)
    w2 = torch.randn(16, 48, generator=g)
    dy = torch.randn(3, 7, 16, generator=g)
    y, xr = linear_and_input(x, w, b)
    got = F.linear(y * y, w2) + xr * 3
    want = F.linear(F.linear(x, w, b) ** 2, w2) + x * 3
    torch.testing.assert_close(got, want)
    for a, e in zip(torch.autograd.grad(got, (x, w, b), dy), torch.autograd.grad(want, (x, w, b), dy)):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
