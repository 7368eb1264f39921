"""Fused bias + dropout + residual-add + LayerNorm over the last dimension, forward and backward, in Triton.

RoBERTa is post-LN: every sublayer ends in ``LayerNorm(dropout(dense(h)) + residual)``. Eager PyTorch runs that
as three kernels after the linear's bias epilogue, keeps the dropout mask and the sum for backward, and sums the
linear's bias gradient over the whole [rows, N] gradient in a pass of its own; here one kernel does it each way
(the linear runs without its bias and passes it here as ``input_bias``), and one small launch sums the
parameters' per-program partial gradients.

For one row h of N features (statistics in fp32 whatever the input dtype; input_bias b_in optional, 0 if absent):

    h     = dropout_p(x + b_in) + residual    dropout_p(z) = z * keep / (1 - p),  keep ~ Bernoulli(1 - p)
    mean  = sum(h) / N
    rstd  = 1 / sqrt(sum((h - mean)^2) / N + eps)                 (biased variance, as torch.nn.LayerNorm)
    xhat  = (h - mean) * rstd
    y     = xhat * weight + bias

and backward, with g = dy * weight:

    dh        = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dresidual = dh
    dx        = dh * keep / (1 - p)
    dweight   = sum over rows of dy * xhat,     dbias = sum over rows of dy,     db_in = sum over rows of dx

The reference is ``reference.layer_norm``: ``F.layer_norm(dropout(x.float() + b_in) + residual.float(), ...)``.

What forward keeps for backward: x, residual, weight, input_bias and two fp32 numbers per row (mean, rstd), plus
the Philox seed of the dropout draw. The keep mask is never stored: backward regenerates it from (seed, row,
column). The pre-norm sum h is not stored either; backward recomputes it from x and residual (see
``_layer_norm_op`` for why). The backward kernel keeps each parameter gradient's band sum in fp32 registers
and writes it as one row of a [programs, k, N] fp32 buffer; ``_partials_sum_kernel`` sums those rows in a fixed
order (repeatable bits, no atomics) and writes each gradient in its parameter's dtype.
"""
import functools
import numbers
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import reference
from ._checks import autocast_enabled, check_tensor, dropout_seed_for, on_device, triton_usable
from ._compile_options import COMPILE_OPTIONS
from ._library import (KernelCost, call, cdiv, custom_op, nbytes, next_power_of_2, register_autograd,
                       register_cost)
from .backend import KernelSwitch

# A row lives in the registers of one program. The backward's per-thread state (weight, two gradient
# accumulators, the row and its gradient; input_bias and its accumulator when given) fits up to 8192 wide
# (ptxas, sm_90: 127 registers at 16 warps without input_bias); up to 16384 it spills a few hundred bytes per
# thread and stays correct; wider rows get a clear error.
MAX_HIDDEN = 16384


@triton.jit
def _dropout_keep(seed, row, p, BLOCK: tl.constexpr):
    """Keep-mask (True = kept) of one row, the same in forward and backward for the same (seed, row).

    Column j uses one Philox4x32-10 call keyed by ``seed`` with the counter (j // 8, row, 0, 0): its four
    32-bit words are eight 16-bit halves, one per column of the group of eight, and column j is kept when
    half j % 2 of word (j // 2) % 4 is >= round(p * 65536) (a keep probability within 2**-17 of 1 - p). The
    eight columns of a group sit in one thread's registers, so the compiler evaluates each call once: a row
    costs BLOCK // 8 Philox evaluations and one integer comparison per column.
    """
    cols = tl.arange(0, BLOCK)
    group = (cols // 8).to(tl.uint32)
    zero = group * 0  # block-shaped counter words: philox's round loop needs them all the same shape
    w0, w1, w2, w3 = tl.philox(seed, group, zero + row, zero, zero)
    word_of = (cols // 2) % 4
    word = tl.where(word_of < 2, tl.where(word_of == 0, w0, w1), tl.where(word_of == 2, w2, w3))
    threshold = tl.minimum(p * 65536.0 + 0.5, 65535.0).to(tl.uint32) << 16
    return tl.where(cols % 2 == 1, word, word << 16) >= threshold


# The dropout seed is read from memory (Seed: a one-element int64 tensor on the device), not passed by value, so
# nothing reads it on the host and a captured CUDA graph replays with the seed drawn into that tensor each step.
@triton.jit
def _layer_norm_fwd_kernel(
    X, IB, R, W, B, Y, Mean, Rstd,
    stride_x, stride_r, stride_y,
    N, eps, dropout_p, dropout_scale, Seed,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_INPUT_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program normalizes one row."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)  # rows * stride may pass 2**31 elements
    cols = tl.arange(0, BLOCK)
    in_row = cols < N

    h = tl.load(X + row64 * stride_x + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_INPUT_BIAS:
        h += tl.load(IB + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = _dropout_keep(tl.load(Seed).to(tl.uint32), row, dropout_p, BLOCK)  # < 2**31: high key word 0
        h = tl.where(keep, h * dropout_scale, 0.0)
    if HAS_RESIDUAL:
        h += tl.load(R + row64 * stride_r + cols, mask=in_row, other=0.0).to(tl.float32)

    mean = tl.sum(h, axis=0) / N
    centered = tl.where(in_row, h - mean, 0.0)  # padding columns must not enter the variance
    var = tl.sum(centered * centered, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = centered * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=in_row, other=0.0).to(tl.float32)

    tl.store(Y + row64 * stride_y + cols, y.to(Y.dtype.element_ty), mask=in_row)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    X, IB, R, W, DY, DX, DR, Partials, Mean, Rstd,
    stride_x, stride_r, stride_dy, stride_dx, stride_dr,
    M, N, dropout_p, dropout_scale, Seed, rows_per_program,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_INPUT_BIAS: tl.constexpr, STORE_DRESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program walks a contiguous band of rows: it writes dx (and dresidual) for each row and keeps the
    band's dweight/dbias/dinput_bias in fp32 registers, stored once at the end as this program's rows of the
    [programs, k, N] partials (k = the gradients present, in that order). ``_partials_sum_kernel`` sums them;
    no atomics, so the reduction order is fixed and the result repeatable.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    in_row = cols < N
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)

    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_BIAS:
        db_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_INPUT_BIAS:
        ib = tl.load(IB + cols, mask=in_row, other=0.0).to(tl.float32)
        dib_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(Seed).to(tl.uint32)  # drawn below 2**31: Philox's high key word is a known 0

    for row in range(row_start, row_end):
        row64 = tl.cast(row, tl.int64)  # a Python int under the interpreter, a tensor when compiled
        # Rebuild h = dropout(x + input_bias) + residual exactly as forward did (same Philox draw).
        h = tl.load(X + row64 * stride_x + cols, mask=in_row, other=0.0).to(tl.float32)
        if HAS_INPUT_BIAS:
            h += ib
        if HAS_DROPOUT:
            # keep / (1 - p) once, for both uses: h here and dx below
            keep_scale = tl.where(_dropout_keep(seed, row, dropout_p, BLOCK), dropout_scale, 0.0)
            h = h * keep_scale
        if HAS_RESIDUAL:
            h += tl.load(R + row64 * stride_r + cols, mask=in_row, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(in_row, (h - mean) * rstd, 0.0)

        dy = tl.load(DY + row64 * stride_dy + cols, mask=in_row, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            dw_acc += dy * xhat
            g = dy * w
        else:
            g = dy
        if HAS_BIAS:
            db_acc += dy
        mean_g = tl.sum(g, axis=0) / N
        mean_gx = tl.sum(g * xhat, axis=0) / N
        dh = (g - mean_g - xhat * mean_gx) * rstd

        if STORE_DRESIDUAL:
            tl.store(DR + row64 * stride_dr + cols, dh.to(DR.dtype.element_ty), mask=in_row)
        if HAS_DROPOUT:
            dh = dh * keep_scale
        if HAS_INPUT_BIAS:
            dib_acc += dh  # the gradient of x + input_bias, summed before dx is rounded to x's dtype
        tl.store(DX + row64 * stride_dx + cols, dh.to(DX.dtype.element_ty), mask=in_row)

    k: tl.constexpr = HAS_WEIGHT + HAS_BIAS + HAS_INPUT_BIAS
    b_slot: tl.constexpr = HAS_WEIGHT * 1  # each gradient's row within this program's k rows
    ib_slot: tl.constexpr = HAS_WEIGHT + HAS_BIAS
    if HAS_WEIGHT:
        tl.store(Partials + pid * k * N + cols, dw_acc, mask=in_row)
    if HAS_BIAS:
        tl.store(Partials + (pid * k + b_slot) * N + cols, db_acc, mask=in_row)
    if HAS_INPUT_BIAS:
        tl.store(Partials + (pid * k + ib_slot) * N + cols, dib_acc, mask=in_row)


@triton.jit
def _partials_sum_kernel(
    Partials, DW, DB, DIB, programs, N,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Column sums of the backward's [programs, k, N] fp32 partials: one program per BLOCK_N columns of all k
    gradients, walking the partial rows BLOCK_P at a time in a fixed order, then writing each gradient in its
    parameter's dtype (the one launch after the backward kernel: no separate sums, no casts)."""
    k: tl.constexpr = HAS_WEIGHT + HAS_BIAS + HAS_INPUT_BIAS
    b_slot: tl.constexpr = HAS_WEIGHT * 1  # each gradient's row within a program's k rows
    ib_slot: tl.constexpr = HAS_WEIGHT + HAS_BIAS
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_cols = cols < N
    rows = tl.arange(0, BLOCK_P)
    acc_w = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_ib = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, programs, BLOCK_P):
        mask = ((start + rows) < programs)[:, None] & in_cols[None, :]
        block = Partials + ((start + rows).to(tl.int64) * (k * N))[:, None] + cols[None, :]
        if HAS_WEIGHT:
            acc_w += tl.sum(tl.load(block, mask=mask, other=0.0), axis=0)
        if HAS_BIAS:
            acc_b += tl.sum(tl.load(block + b_slot * N, mask=mask, other=0.0), axis=0)
        if HAS_INPUT_BIAS:
            acc_ib += tl.sum(tl.load(block + ib_slot * N, mask=mask, other=0.0), axis=0)
    if HAS_WEIGHT:
        tl.store(DW + cols, acc_w.to(DW.dtype.element_ty), mask=in_cols)
    if HAS_BIAS:
        tl.store(DB + cols, acc_b.to(DB.dtype.element_ty), mask=in_cols)
    if HAS_INPUT_BIAS:
        tl.store(DIB + cols, acc_ib.to(DIB.dtype.element_ty), mask=in_cols)


# The partial-sum kernel's tile: 128 partial rows x 32 columns (a 128-byte line per row, 16 KB of fp32 per
# gradient per step), so a 768-wide LayerNorm with an H100's 528 partial rows runs 24 programs of 5 steps.
PARTIALS_BLOCK_P, PARTIALS_BLOCK_N = 128, 32


def _launch_config(n):
    """Block covering a row (masked past n) and warps scaled to it: ~8 elements per thread at 1024 wide."""
    block = max(next_power_of_2(n), 16)
    num_warps = min(max(block // 256, 1), 16)
    return block, num_warps


def _backward_programs(rows, device):
    """How many programs share the backward's rows. Each one writes a row of fp32 partials per parameter,
    so more programs hide more memory latency but add partial-buffer traffic; four per SM keeps that
    traffic a few percent of the row traffic at RoBERTa's widths. Fixed for a given device, so the
    dweight/dbias reduction order (and its bits) is repeatable. The interpreter runs programs one by one:
    a handful suffices and still exercises bands of unequal length."""
    if device.type == "cuda":
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4
    return max(1, min(rows, target))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _as_rows(t, n):
    """[rows, n] view of ``t`` when its rows are evenly strided with contiguous features (no copy: kernels
    take a row stride); otherwise one contiguous copy."""
    t2 = t if t.dim() == 2 else t.reshape(-1, n)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _layer_norm_forward(x, weight, bias, residual, input_bias, eps, dropout_p, seed):
    """Launch the forward kernel: (y with x's shape and dtype, mean, rstd: fp32 of shape x.shape[:-1]).

    ``seed``: the dropout seed tensor (``_checks.new_dropout_seed``), None without dropout."""
    n = x.shape[-1]
    x2 = _as_rows(x, n)
    r2 = _as_rows(residual, n) if residual is not None else None
    weight, bias, input_bias = (_dense(t) for t in (weight, bias, input_bias))
    m = x2.shape[0]
    has_dropout = dropout_p > 0.0
    scale = 1.0 / (1.0 - dropout_p) if has_dropout else 1.0

    # Outputs allocated in their final shapes (contiguous: row stride n), so that no view is made per call.
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    block, num_warps = _launch_config(n)
    if m > 0:
        with on_device(x):
            _layer_norm_fwd_kernel[(m,)](
                x2, input_bias, r2, weight, bias, y, mean, rstd,
                x2.stride(0), r2.stride(0) if r2 is not None else 0, n,
                n, eps, dropout_p, scale, seed if has_dropout else None,
                HAS_RESIDUAL=r2 is not None, HAS_DROPOUT=has_dropout,
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_INPUT_BIAS=input_bias is not None,
                BLOCK=block, num_warps=num_warps, **COMPILE_OPTIONS,
            )
    return y, mean, rstd


def _dense(t):
    """A [N] parameter as the kernels index it (densely), or None."""
    return t.contiguous() if t is not None else None


def _layer_norm_backward(dy, x, residual, weight, bias, input_bias, mean, rstd, dropout_p, seed):
    """Launch the backward kernel and the partial-sum kernel: (dx, dresidual, dweight, dbias, dinput_bias).
    dresidual is None without a residual and also when it equals dx (no dropout: the caller passes dx for
    both, as autograd's own add does); each parameter's gradient is in its own dtype, None when it is absent
    (``bias`` is passed for its dtype only)."""
    n = x.shape[-1]
    x2 = _as_rows(x, n)
    r2 = _as_rows(residual, n) if residual is not None else None
    weight, input_bias = _dense(weight), _dense(input_bias)
    mean, rstd = mean.reshape(-1), rstd.reshape(-1)
    m = x2.shape[0]
    has_residual = r2 is not None
    has_dropout = dropout_p > 0.0
    scale = 1.0 / (1.0 - dropout_p) if has_dropout else 1.0
    block, num_warps = _launch_config(n)
    dy2 = _as_rows(dy, n)  # an expanded gradient (stride-0 rows, e.g. from .sum()) needs no copy

    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, row stride n (see the forward)
    store_dresidual = has_residual and has_dropout
    dr = torch.empty(x.shape, dtype=r2.dtype, device=x.device) if store_dresidual else None

    params = (weight, bias, input_bias)
    if m == 0:  # the sums over no rows
        return (dx, dr, *(torch.zeros(n, dtype=p.dtype, device=x2.device) if p is not None else None
                          for p in params))
    programs = _backward_programs(m, x2.device)
    rows_per_program = cdiv(m, programs)
    programs = cdiv(m, rows_per_program)  # no program left without rows
    k = sum(p is not None for p in params)
    # One fp32 buffer for every gradient's partial rows, so that one launch sums them all.
    partials = torch.empty((programs, k, n), dtype=torch.float32, device=x2.device) if k else None
    grads = [torch.empty(n, dtype=p.dtype, device=x2.device) if p is not None else None for p in params]
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_INPUT_BIAS=input_bias is not None)
    with on_device(x2):
        _layer_norm_bwd_kernel[(programs,)](
            x2, input_bias, r2, weight, dy2, dx, dr, partials, mean, rstd,
            x2.stride(0), r2.stride(0) if has_residual else 0, dy2.stride(0), n,
            n if store_dresidual else 0,
            m, n, dropout_p, scale, seed if has_dropout else None, rows_per_program,
            HAS_RESIDUAL=has_residual, HAS_DROPOUT=has_dropout, STORE_DRESIDUAL=store_dresidual,
            BLOCK=block, num_warps=num_warps, **flags, **COMPILE_OPTIONS,
        )
        if k:
            _partials_sum_kernel[(cdiv(n, PARTIALS_BLOCK_N),)](
                partials, *grads, programs, n,
                BLOCK_P=PARTIALS_BLOCK_P, BLOCK_N=PARTIALS_BLOCK_N, num_warps=4, **flags, **COMPILE_OPTIONS,
            )
    return (dx, dr, *grads)


# The custom ops (see _library.py). What forward keeps for backward: x, residual, weight, input_bias, the per-row
# mean and rstd, and the seed tensor. h = dropout(x + input_bias) + residual is recomputed in backward rather than
# stored: storing it costs one extra [rows, n] write in forward and saves one read in backward (x and residual
# instead of h), the same bytes over a training step, but it slows the forward, which also runs alone (eval), and
# costs a tensor's memory when there is no residual (then h is x itself). The residual is usually held by autograd
# anyway (it is the previous sublayer's output, the input of a Linear). The dropout mask is recomputed from the seed.
@custom_op("layer_norm")
def _layer_norm_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   residual: Optional[torch.Tensor], input_bias: Optional[torch.Tensor], eps: float,
                   dropout_p: float, seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _layer_norm_forward(x, weight, bias, residual, input_bias, eps, dropout_p, seed)


@_layer_norm_op.register_fake
def _(x, weight, bias, residual, input_bias, eps, dropout_p, seed):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), stats, torch.empty_like(stats)


@custom_op("layer_norm_backward")
def _layer_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, residual: Optional[torch.Tensor],
                            weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                            input_bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                            dropout_p: float, seed: Optional[torch.Tensor]
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Custom ops return tensors: an absent gradient is an empty one (the autograd formula turns it into None).
    out = _layer_norm_backward(dy, x, residual, weight, bias, input_bias, mean, rstd, dropout_p, seed)
    none = x.new_empty(0)
    return tuple(none.clone() if t is None else t for t in out)


@_layer_norm_backward_op.register_fake
def _(dy, x, residual, weight, bias, input_bias, mean, rstd, dropout_p, seed):
    store_dr = residual is not None and dropout_p > 0.0
    return (x.new_empty(x.shape), x.new_empty(x.shape if store_dr else (0,)),
            *(x.new_empty(p.shape, dtype=p.dtype) if p is not None else x.new_empty(0)
              for p in (weight, bias, input_bias)))


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, residual, input_bias, eps, dropout_p, seed = inputs
    _, mean, rstd = output
    # bias is kept for its dtype (the gradient is written in it); backward does not read it.
    ctx.save_for_backward(x, residual, weight, bias, input_bias, mean, rstd, seed)
    ctx.dropout_p = dropout_p
    ctx.set_materialize_grads(False)  # mean's and rstd's gradients stay None, not zeros (two launches per call)


def _layer_norm_grad(ctx, dy, _dmean, _drstd):
    if dy is None:
        return (None,) * 8
    x, residual, weight, bias, input_bias, mean, rstd, seed = ctx.saved_tensors
    dx, dr, dw, db, dib = call(_layer_norm_backward_op, dy, x, residual, weight, bias, input_bias, mean, rstd,
                               ctx.dropout_p, seed)
    if residual is None:
        dr = None
    elif ctx.dropout_p == 0.0:
        dr = dx  # without dropout dresidual equals dx: one tensor for both
    return (dx, dw if weight is not None else None, db if bias is not None else None, dr,
            dib if input_bias is not None else None, None, None, None)


register_autograd(_layer_norm_op, _layer_norm_grad, _layer_norm_setup)

# What the launch code runs on a GPU (see _library.COSTS). The backward's programs count is an H100's
# (132 SMs, four programs each): their fp32 partial rows (one per parameter gradient) are written once and
# summed by one small launch that writes each gradient in its parameter's dtype.
H100_BACKWARD_PROGRAMS = 4 * 132


@register_cost("layer_norm")
def _layer_norm_cost(x, weight, bias, residual, input_bias, eps, dropout_p, seed):
    rows = x.numel() // x.shape[-1]
    read = nbytes(x) + nbytes(residual) + nbytes(weight) + nbytes(bias) + nbytes(input_bias)
    return [KernelCost("layer_norm_fwd", "norm", 0, read, nbytes(x) + 8 * rows)]


@register_cost("layer_norm_backward")
def _layer_norm_backward_cost(dy, x, residual, weight, bias, input_bias, mean, rstd, dropout_p, seed):
    n = x.shape[-1]
    programs = max(1, min(x.numel() // n, H100_BACKWARD_PROGRAMS))
    params = [p for p in (weight, bias, input_bias) if p is not None]
    partials = programs * len(params) * n * 4
    store_dr = residual is not None and dropout_p > 0.0
    read = (nbytes(dy) + nbytes(x) + nbytes(residual) + nbytes(weight) + nbytes(input_bias) + nbytes(mean)
            + nbytes(rstd))
    kernels = [KernelCost("layer_norm_bwd", "norm", 0, read, nbytes(x) * (1 + store_dr) + partials)]
    if params:
        kernels.append(KernelCost("layer_norm_partials_sum", "norm", 0, partials,
                                  sum(p.shape[-1] * p.element_size() for p in params)))
    return kernels


def _check_inputs(x, weight, bias, eps, residual, dropout_p, input_bias=None):
    check_tensor("x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (hidden) dimension, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if n > MAX_HIDDEN:
        raise ValueError(f"hidden size {n} exceeds {MAX_HIDDEN}, the widest row the fused LayerNorm keeps in "
                         "registers; use torch.nn.LayerNorm (or fastroberta.kernels.reference.layer_norm)")
    # Parameters may be kept in fp32 while activations are fp16/bf16 (mixed precision); the kernel reads
    # either and returns their gradients in their own dtype.
    param_dtypes = (x.dtype, torch.float32)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_tensor(name, p, dtypes=param_dtypes, device=x.device)
        if p.shape != (n,):
            raise ValueError(f"{name} has shape {tuple(p.shape)} but x's hidden size is {n}: expected ({n},)")
    if input_bias is not None:  # the preceding linear's bias: read in fp32 whatever its dtype
        check_tensor("input_bias", input_bias, device=x.device)
        if input_bias.shape != (n,):
            raise ValueError(f"input_bias has shape {tuple(input_bias.shape)} but x's hidden size is {n}: "
                             f"expected ({n},)")
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), device=x.device)
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0.0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def layer_norm(x, weight, bias, eps=1e-5, residual=None, dropout_p=0.0, input_bias=None, dropout_seed=None):
    """``LN(dropout(x + input_bias) + residual) * weight + bias`` over the last dimension, differentiable in x,
    residual, weight, bias and input_bias.

    x: [..., N] fp32/fp16/bf16, any leading shape, N <= MAX_HIDDEN; the output has x's shape and dtype.
    weight, bias: [N] in x's dtype or fp32, or None (no affine). residual: x's shape and dtype, or None.
    input_bias: [N] of any float dtype (read in fp32), or None: the bias of the linear layer that made x, added
    here (before dropout, as ``dropout(dense(h))`` would) so that the linear runs without one and its gradient
    is summed in the backward kernel instead of by a pass over the [rows, N] gradient.
    dropout_p: the caller passes 0 in eval; 0 runs no dropout code at all. The Philox seed comes from torch's
    generator of x's device, so ``torch.manual_seed`` reproduces the mask, unless ``dropout_seed`` (a one-element
    int64 tensor on x's device, a slice of ``new_dropout_seeds``) gives it. Inputs whose rows are not evenly strided
    are copied once to contiguous memory. Parameter gradients come back in the parameters' dtypes. Runs the
    Triton kernel on CUDA (or on CPU under ``TRITON_INTERPRET=1``), ``reference.layer_norm`` elsewhere.
    """
    _check_inputs(x, weight, bias, eps, residual, dropout_p, input_bias)
    if not triton_usable(x):
        return reference.layer_norm(x, weight, bias, eps=eps, residual=residual, dropout_p=dropout_p,
                                    input_bias=input_bias)
    dropout_p = float(dropout_p)
    seed = dropout_seed_for(dropout_p, dropout_seed, x.device)
    return call(_layer_norm_op, x, weight, bias, residual, input_bias, float(eps), dropout_p, seed)[0]


class FusedLayerNorm(KernelSwitch, torch.nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm`` (same parameters, state_dict keys and ``extra_repr``; an
    nn.LayerNorm state_dict loads as is) over a 1-D ``normalized_shape``, whose forward can also fuse a
    residual add, dropout and the preceding linear's bias: ``forward(x, residual=None, dropout_p=0.0,
    input_bias=None, dropout_seed=None)`` = LN(dropout(x + input_bias) + residual).
    Like ``F.dropout`` called with explicit p, it does not look at ``self.training``: pass 0 in eval.
    ``kernels`` ("auto" | "triton" | "torch", see ``backend``) picks the Triton kernel or the eager reference;
    the model builds every LayerNorm from this class. Under ``torch.autocast`` it computes and returns fp32, as
    autocast makes ``nn.LayerNorm`` do (x and residual may then differ in dtype); otherwise x's dtype."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None,
                 kernels="auto"):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"FusedLayerNorm normalizes over the last dimension only: normalized_shape must "
                             f"be an int or have one entry, got {tuple(self.normalized_shape)}")
        self._init_kernels(kernels)

    def forward(self, x, residual=None, dropout_p=0.0, input_bias=None, dropout_seed=None):
        ops = self.ops(x.device)
        if autocast_enabled(x.device):
            # As autocast runs nn.LayerNorm: in fp32, returning fp32. The residual stream then stays fp32 while
            # the linear layers return the autocast dtype, so both inputs are brought to fp32 here.
            with torch.autocast(x.device.type, enabled=False):
                return ops.layer_norm(x.float(), _fp32(self.weight), _fp32(self.bias), self.eps,
                                      residual=None if residual is None else residual.float(), dropout_p=dropout_p,
                                      input_bias=input_bias, dropout_seed=dropout_seed)
        return ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual, dropout_p=dropout_p,
                              input_bias=input_bias, dropout_seed=dropout_seed)


def _fp32(p):
    return p if p is None else p.float()
