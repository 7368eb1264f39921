"""GELU's backward and the bias gradient of the linear layer before it, in one pass, in Triton.

The FFN computes act = GELU(pre), pre = x W^T + b, on [tokens, intermediate] tensors (the widest of the layer).
Its backward needs dpre = dact * GELU'(pre) and db = the column sums of dpre: eagerly two kernels, the second
reading the whole of dpre again. Here one kernel reads dact and pre once, writes dpre and adds each program's
rows into fp32 column partials; a small sum over the partials gives db.

    GELU'(x) = Phi(x) + x phi(x),   Phi(x) = (1 + erf(x / sqrt 2)) / 2,   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)

(the exact, erf form that ``F.gelu`` and transformers' "gelu" use), computed in fp32 whatever the input dtype.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from . import reference
from ._checks import FLOAT_DTYPES, check_tensor, on_device, triton_usable
from ._compile_options import COMPILE_OPTIONS
from ._library import KernelCost, call, cdiv, custom_op, nbytes, register_cost

BLOCK_M, BLOCK_N = 32, 128
ROWS_PER_PROGRAM = 512  # rows one program walks: its fp32 partial row is 1/512 of the rows' traffic


@triton.jit
def _gelu_backward_bias_grad_kernel(DAct, Pre, DPre, Partial, stride_a, stride_p, stride_d, M, N, rows_per_program,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_cols = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row0 = pid_m * rows_per_program
    for start in range(row0, row0 + rows_per_program, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        keep = (rows[:, None] < M) & in_cols[None, :]
        x = tl.load(Pre + rows[:, None] * stride_p + cols[None, :], mask=keep, other=0.0).to(tl.float32)
        g = tl.load(DAct + rows[:, None] * stride_a + cols[None, :], mask=keep, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        d = g * (cdf + x * pdf)
        tl.store(DPre + rows[:, None] * stride_d + cols[None, :], d.to(DPre.dtype.element_ty), mask=keep)
        acc += tl.sum(tl.where(keep, d, 0.0), axis=0)
    tl.store(Partial + pid_m * N + cols, acc, mask=in_cols)


def _bands(m):
    return cdiv(m, ROWS_PER_PROGRAM) if m else 0


def _gelu_backward_bias_grad_launch(dact, pre):
    m, n = pre.shape
    dpre = torch.empty((m, n), dtype=pre.dtype, device=pre.device)
    bands = _bands(m)
    partial = torch.empty((bands, n), dtype=torch.float32, device=pre.device)
    if m:
        with on_device(pre):
            _gelu_backward_bias_grad_kernel[(cdiv(n, BLOCK_N), bands)](
                dact, pre, dpre, partial, dact.stride(0), pre.stride(0), dpre.stride(0), m, n, ROWS_PER_PROGRAM,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4, **COMPILE_OPTIONS)
    return dpre, partial.sum(0)


# The custom op (see _library.py). It runs inside autograd's backward only, so it has no autograd formula.
@custom_op("gelu_backward_bias_grad")
def _gelu_backward_bias_grad_op(dact: torch.Tensor, pre: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return _gelu_backward_bias_grad_launch(dact, pre)


@_gelu_backward_bias_grad_op.register_fake
def _(dact, pre):
    return pre.new_empty(pre.shape), pre.new_empty(pre.shape[-1:], dtype=torch.float32)


@register_cost("gelu_backward_bias_grad")
def _gelu_backward_bias_grad_cost(dact, pre):
    m, n = pre.shape
    partial = _bands(m) * n * 4
    return [KernelCost("gelu_bwd_bias_grad", "elementwise", 0, nbytes(dact) + nbytes(pre), nbytes(pre) + partial),
            KernelCost("gelu_bias_grad_sum", "elementwise", 0, partial, 4 * n)]


def gelu_backward_bias_grad(dact, pre):
    """(dpre, dbias) for act = GELU(pre), pre = x W^T + b: dpre = dact * GELU'(pre) in pre's dtype and dbias =
    the column sums of dpre in fp32. dact, pre: [rows, n] of one float dtype (rows with a unit column stride).
    Runs the Triton kernel where ``triton_usable(pre)``, ``reference.gelu_backward_bias_grad`` elsewhere."""
    check_tensor("pre", pre, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("dact", dact, dtypes=(pre.dtype,), ndim=2, device=pre.device)
    if dact.shape != pre.shape:
        raise ValueError(f"dact has shape {tuple(dact.shape)} but pre has {tuple(pre.shape)}")
    if not triton_usable(pre):
        return reference.gelu_backward_bias_grad(dact, pre)
    dact, pre = (t if t.stride(-1) == 1 else t.contiguous() for t in (dact, pre))
    return call(_gelu_backward_bias_grad_op, dact, pre)
