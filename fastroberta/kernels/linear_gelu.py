"""The FFN's GEMMs with GELU in their epilogues, in Triton: the [tokens, intermediate] activation never makes a
separate elementwise pass.

A post-LN FFN computes pre = x W1^T + b1, act = GELU(pre), out = act W2^T + b2. Eagerly, GELU reads pre and
writes act (one pass over the layer's widest tensor), and in the backward the dgrad GEMM of the second linear
writes dact = dout W2, which a GELU-backward pass reads again with pre to write dpre = dact * GELU'(pre). Here:

- ``linear_gelu(x, w, b) -> (pre, act)``: the first GEMM adds the bias and writes both pre (kept for the
  backward) and GELU(pre) (the second linear's input) from its fp32 accumulator.
- ``dgrad_gelu_bias_grad(dout, w2, pre) -> (dpre, dbias)``: the second linear's dgrad GEMM (dout [rows, e] @
  w2 [e, n]) multiplies its accumulator by GELU'(pre) (reading the pre tile) and writes dpre only; each row
  block's fp32 column sums of dpre go to a partial row, and a sum over the partial rows (a [rows / BLOCK_M, n]
  fp32 tensor, 1/64 of dpre's bytes) gives the first linear's bias gradient, deterministically.

    GELU(x) = x Phi(x),   GELU'(x) = Phi(x) + x phi(x),   Phi(x) = (1 + erf(x / sqrt 2)) / 2,
    phi(x) = exp(-x^2 / 2) / sqrt(2 pi)

(the exact erf form of ``F.gelu`` and RoBERTa's "gelu"), in fp32 whatever the input dtype. fp16/bf16 inputs use
tensor cores with fp32 accumulation; fp32 inputs multiply as torch's fp32 matmuls are set to
(``attention.fp32_dot_precision``: TF32 or exact). Rows may be any count (the masks cover ragged tiles).
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from . import reference
from ._checks import FLOAT_DTYPES, check_tensor, interpreter_active, on_device, triton_usable
from ._compile_options import COMPILE_OPTIONS
from ._library import KernelCost, call, cdiv, custom_op, nbytes, register_cost
from .attention import AUTOTUNE, fp32_dot_precision

GROUP_M = tl.constexpr(8)  # row blocks that walk the column blocks together, so that a band of W stays in L2


def _configs(interpreter, default, candidates):
    """The interpreter's one config (small blocks, several of them per test shape), or the GPU default first
    and then the autotune candidates unless FASTROBERTA_AUTOTUNE=0 (BLOCK_N, BLOCK_K, warps, stages)."""
    def cfg(n, k, warps, stages):
        return triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
    if interpreter_active():
        return [cfg(*interpreter, 1, 1)]
    return [cfg(*default)] + ([cfg(*c) for c in candidates] if AUTOTUNE else [])


# BLOCK_M is fixed per kernel (not tuned): the dgrad kernel's partial bias rows are one per row block, so their
# count must be known before the launch. Under the interpreter the blocks differ per dimension so that a test
# catches a mixed-up index.
FWD_BLOCK_M = 16 if interpreter_active() else 128
DGRAD_BLOCK_M = 32 if interpreter_active() else 128
# The GPU tiles are 128 x 128 x 64 with 8 warps: the fp32 accumulator and the GELU epilogue fit without spills
# on sm_90 (`python -m benchmarks static`), where 4 warps at 128 x 128, or 128 x 256 tiles, spill ~700-900 B.
GPU_DEFAULT, GPU_CANDIDATES = (128, 64, 8, 3), [(128, 64, 8, 4), (128, 32, 8, 4), (64, 64, 4, 4)]
_FWD_CONFIGS = _configs((32, 16), GPU_DEFAULT, GPU_CANDIDATES)
_DGRAD_CONFIGS = _configs((16, 16), GPU_DEFAULT, GPU_CANDIDATES)
_AUTOTUNE_KEY = ["N", "K"]  # not the row count: unpadded batches vary it every step


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(pid_m, pid_n) of this program, GROUP_M row blocks at a time over all the column blocks."""
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def _matmul_tile(A, B, rows, cols, stride_a, stride_bk, stride_bn, M, N, K, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp32 [BLOCK_M, BLOCK_N] tile of A B at ``rows`` x ``cols``: A [M, K] with a unit column stride, B [K, N]
    addressed by its two strides (the forward's W^T is W [N, K] read with strides (1, row stride), the dgrad's W
    [K, N] with (row stride, 1)). Rows, columns and K beyond the ends load as 0."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        a = tl.load(A + rows[:, None] * stride_a + k[None, :], mask=(rows[:, None] < M) & (k[None, :] < K),
                    other=0.0)
        b = tl.load(B + cols[None, :] * stride_bn + k[:, None] * stride_bk,
                    mask=(cols[None, :] < N) & (k[:, None] < K), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _linear_gelu_fwd_kernel(X, W, B, Pre, Act, stride_x, stride_w, stride_o, M, N, K, PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # pre = X W^T + B: X [M, K], W [N, K] (nn.Linear's layout), both with a unit column stride.
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _matmul_tile(X, W, rows, cols, stride_x, 1, stride_w, M, N, K, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    acc += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    act = acc * 0.5 * (1.0 + tl.erf(acc * 0.7071067811865476))
    keep = (rows[:, None] < M) & (cols[None, :] < N)
    out = rows[:, None] * stride_o + cols[None, :]
    tl.store(Pre + out, acc.to(Pre.dtype.element_ty), mask=keep)
    tl.store(Act + out, act.to(Act.dtype.element_ty), mask=keep)


@triton.jit
def _dgrad_gelu_kernel(DOut, W, Pre, DPre, Partial, stride_d, stride_w, stride_p, stride_o, M, N, K,
                       PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    # dact = DOut W: DOut [M, K], W [K, N] (the second linear's weight, [out, in]); dpre = dact * GELU'(pre).
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _matmul_tile(DOut, W, rows, cols, stride_d, stride_w, 1, M, N, K, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    keep = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(Pre + rows[:, None] * stride_p + cols[None, :], mask=keep, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    d = acc * (cdf + x * pdf)  # 0 outside the tile's real rows and columns: acc and x are 0 there
    tl.store(DPre + rows[:, None] * stride_o + cols[None, :], d.to(DPre.dtype.element_ty), mask=keep)
    tl.store(Partial + pid_m * N + cols, tl.sum(d, axis=0), mask=cols < N)


def _prune(configs, named_args, **kwargs):
    """fp32 runs the default config only: its tiles take twice fp16's shared memory, and the wider candidates
    would not fit an H100 block's 227 KiB."""
    return configs[:1] if named_args["W"].dtype == torch.float32 else configs


_PRUNE = {"early_config_prune": _prune}
_linear_gelu_fwd_tuned = triton.autotune(configs=_FWD_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE)(
    _linear_gelu_fwd_kernel)
_dgrad_gelu_tuned = triton.autotune(configs=_DGRAD_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE)(
    _dgrad_gelu_kernel)


def _precision(dtype):
    return fp32_dot_precision() if dtype == torch.float32 else "tf32"  # fp16/bf16 dots ignore it


def _launch(tuned, m, n, k, block_m, *args, **kwargs):
    """Autotuned, or (one config: the interpreter, FASTROBERTA_AUTOTUNE=0) the default config launched directly
    so that nothing is benchmarked."""
    def grid(meta):
        return (cdiv(m, block_m) * cdiv(n, meta["BLOCK_N"]),)
    if len(tuned.configs) > 1:
        return tuned[grid](*args, BLOCK_M=block_m, **kwargs, **COMPILE_OPTIONS)
    config = tuned.configs[0].all_kwargs()
    if interpreter_active():
        config.update(_interpreter_blocks(n, k, config))
    return tuned.fn[grid(config)](*args, BLOCK_M=block_m, **kwargs, **config, **COMPILE_OPTIONS)


def _interpreter_blocks(n, k, config):
    """The interpreter runs each program's loop in Python: model-sized GEMMs (a test model's FFN, 256 -> 1024)
    take wider N and K blocks, ~16x fewer loop iterations; the kernel tests' shapes (N < 256, K < 128) keep the
    small blocks that span several tiles in every dimension."""
    return {"BLOCK_N": 128 if n >= 256 else config["BLOCK_N"], "BLOCK_K": 64 if k >= 128 else config["BLOCK_K"]}


def _linear_gelu_launch(x, w, b):
    m, k = x.shape
    n = w.shape[0]
    pre = torch.empty((m, n), dtype=x.dtype, device=x.device)
    act = torch.empty_like(pre)
    if m and n:
        with on_device(x):
            _launch(_linear_gelu_fwd_tuned, m, n, k, FWD_BLOCK_M, x, w, b, pre, act, x.stride(0), w.stride(0),
                    pre.stride(0), m, n, k, PRECISION=_precision(x.dtype))
    return pre, act


def _bands(m):
    return cdiv(m, DGRAD_BLOCK_M)


def _dgrad_gelu_launch(dout, w, pre):
    m, k = dout.shape
    n = w.shape[1]
    dpre = torch.empty((m, n), dtype=pre.dtype, device=pre.device)
    partial = torch.empty((_bands(m), n), dtype=torch.float32, device=pre.device)
    if m and n:
        with on_device(pre):
            _launch(_dgrad_gelu_tuned, m, n, k, DGRAD_BLOCK_M, dout, w, pre, dpre, partial, dout.stride(0),
                    w.stride(0), pre.stride(0), dpre.stride(0), m, n, k, PRECISION=_precision(pre.dtype))
    return dpre, partial.sum(0)


# The custom ops (see _library.py). They run inside fused_linear's autograd function: no autograd formula.
@custom_op("linear_gelu")
def _linear_gelu_op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return _linear_gelu_launch(x, w, b)


@_linear_gelu_op.register_fake
def _(x, w, b):
    shape = (x.shape[0], w.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


@custom_op("dgrad_gelu_bias_grad")
def _dgrad_gelu_op(dout: torch.Tensor, w: torch.Tensor, pre: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return _dgrad_gelu_launch(dout, w, pre)


@_dgrad_gelu_op.register_fake
def _(dout, w, pre):
    return pre.new_empty(pre.shape), pre.new_empty(pre.shape[-1:], dtype=torch.float32)


@register_cost("linear_gelu")
def _linear_gelu_cost(x, w, b):
    m, k = x.shape
    n = w.shape[0]
    out = m * n * x.element_size()
    return [KernelCost("linear_gelu", "GEMM", 2 * m * n * k, nbytes(x) + nbytes(w) + nbytes(b), 2 * out)]


@register_cost("dgrad_gelu_bias_grad")
def _dgrad_gelu_cost(dout, w, pre):
    m, k = dout.shape
    n = w.shape[1]
    partial = _bands(m) * n * 4
    return [KernelCost("dgrad_gelu_bias_grad", "GEMM", 2 * m * n * k, nbytes(dout) + nbytes(w) + nbytes(pre),
                       nbytes(pre) + partial),
            KernelCost("gelu_bias_grad_sum", "elementwise", 0, partial, 4 * n)]


def _check_2d(name, t, dtype, device):
    check_tensor(name, t, dtypes=(dtype,), ndim=2, device=device)


def linear_gelu(x, w, b):
    """(pre, act) = (x W^T + b, GELU(x W^T + b)) for x [rows, k], w [n, k], b [n], one float dtype; both
    outputs [rows, n] in that dtype. The Triton kernel where ``triton_usable(x)``, ``reference.linear_gelu``
    elsewhere."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    _check_2d("w", w, x.dtype, x.device)
    check_tensor("b", b, dtypes=(x.dtype,), ndim=1, device=x.device)
    if w.shape[1] != x.shape[1] or b.shape[0] != w.shape[0]:
        raise ValueError(f"x {tuple(x.shape)}, w {tuple(w.shape)} and b {tuple(b.shape)} do not fit x W^T + b")
    if not triton_usable(x):
        return reference.linear_gelu(x, w, b)
    x, w = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, w))
    return call(_linear_gelu_op, x, w, b.contiguous())


def dgrad_gelu_bias_grad(dout, w, pre):
    """(dpre, dbias) for out = GELU(pre) W^T (+ any bias): dpre = (dout W) * GELU'(pre) in pre's dtype and
    dbias = dpre's column sums in fp32 (the bias gradient of the linear that made pre). dout [rows, e],
    w [e, n], pre [rows, n], one float dtype. The Triton kernel where ``triton_usable(pre)``,
    ``reference.dgrad_gelu_bias_grad`` elsewhere."""
    check_tensor("pre", pre, dtypes=FLOAT_DTYPES, ndim=2)
    _check_2d("dout", dout, pre.dtype, pre.device)
    _check_2d("w", w, pre.dtype, pre.device)
    if dout.shape[0] != pre.shape[0] or w.shape != (dout.shape[1], pre.shape[1]):
        raise ValueError(f"dout {tuple(dout.shape)}, w {tuple(w.shape)} and pre {tuple(pre.shape)} do not fit "
                         "(dout W) * GELU'(pre)")
    if not triton_usable(pre):
        return reference.dgrad_gelu_bias_grad(dout, w, pre)
    dout, w, pre = (t if t.stride(-1) == 1 else t.contiguous() for t in (dout, w, pre))
    return call(_dgrad_gelu_op, dout, w, pre)
