"""Masked-LM decoder + softmax cross-entropy over the labelled rows only, never holding [N, V] logits.

The MLM head ends in a decoder to V = 50,265 classes. Eager PyTorch builds logits for every token, a softmax
copy and its gradient, although only ~15% of the rows carry a label. Here the loss costs in proportion to the
labelled rows, and at most one chunk of [C, V] logits exists at a time.

With S the rows whose label y_i != ignore_index, n = |S|, z_i = h_i W^T + b (W: [V, E], the tied word
embeddings; z in the input dtype, everything computed from it in fp32):

    lse_i       = log sum_v exp(z_iv)                        (online: running max m and sum s rescaled by
                                                              exp(m_old - m_new) as each block of V arrives)
    loss        = 1/n * sum_{i in S} (lse_i - z_{i,y_i})     (0 when n = 0)
    dz_i        = g / n * (exp(z_i - lse_i) - onehot(y_i))   g = the incoming grad_output (it carries the
                                                              fp16 loss scale)
    dh_i        = dz_i W        dW = sum_i dz_i^T h_i        db = sum_i dz_i
    num_correct = #{i in S : argmax_v z_iv == y_i}           (first maximum on ties, as torch.argmax)

The reference is ``reference.mlm_cross_entropy``: ``F.cross_entropy`` on the full fp32 logits of the labelled
rows.

How it runs:
- Ignored rows are dropped by ``index_select`` before anything else; autograd scatters zero gradients back.
- The labelled rows go through in chunks of C rows, C chosen so that a chunk's logits fit in ``CHUNK_BYTES``
  (and balanced, so the last chunk is not a sliver). One [C, V] buffer is reused by every chunk; its rows are
  padded to a multiple of 64 elements (``_row_stride``) so that the row kernels load whole 16-byte vectors.
- Forward, per chunk: z = addmm(b, h, W^T) by cuBLAS (fp32 accumulation) into the buffer, then one program
  per row sweeps V once (``_lse_forward_kernel``) for lse, the row's loss and its argmax. Besides its inputs
  (the selected rows h are an activation the model keeps anyway), forward saves n fp32 lse values.
- Backward, per chunk: z is recomputed, ``_logits_grad_kernel`` overwrites it in place with
  d_i = (exp(z_i - lse_i) - onehot(y_i)) * 2^15 (``DZ_SCALE``; formed in fp32, rounded once to the input
  dtype), then cuBLAS computes d W and d^T h with fp32 outputs (``_mm_fp32``), db sums d in fp32, and
  g / (n 2^15), a device tensor, turns them into dh (rounded once into its dtype), dW and db.

Decisions, and why:
- The buffer holds (softmax - onehot) * 2^15, not dz: at N = 16,384 labelled rows and V = 50,265, softmax * g/n
  is ~1e-9 per logit at g = 1 (no loss scale), below fp16's smallest subnormal (6e-8); stored as dz it flushed
  to zero (an H200 measured grad bias 20% off, grad hidden 2%). Unscaled it lies in [-1, 1]; 2^15 puts its top
  at 32,768 < 65,504, and entries down to 2^-39 survive. g/n and 2^-15 are applied to the GEMMs' fp32 results,
  so what is rounded to 16 bits is the final gradient, once: an entry flushes or overflows only where the fp32
  gradient is itself outside fp16's range (an overflow under a loss scale is an inf DeepSpeed sees and lowers
  the scale for). The fp32 GEMM outputs are what make 2^15 safe: an fp16 d W would overflow for |W| > 1.
- dW accumulates across chunks in fp32: the first chunk's GEMM writes the V x E fp32 accumulator, later
  chunks add fp32 partial products of ``DW_SLICE_ROWS`` rows of V to it, and the end writes
  g / (n 2^15) * dW into the weight's dtype. At V = 50,265, E = 768 that is 154 MB + 25 MB held through the
  chunk loop where a 16-bit accumulator took 77 MB (the 16-bit result is allocated after the chunk buffer is
  freed), and, per chunk after the first, reading and writing the fp32 accumulator (~0.6 GB of traffic).
- dz is formed in backward, instead of in forward as Liger-Kernel does (forward-time dh and dW, scaled by g in
  backward). Forming it in backward costs one more logits GEMM per chunk; in return nothing of size V x E is
  held between forward and backward, and a forward under no_grad does no gradient work at all.
- Logits live in the input dtype, not fp32: that halves the chunk, and the in-place gradient feeds the two
  backward GEMMs on tensor cores as is. Rounding z to fp16/bf16 is what every 16-bit decoder (eager, Hugging
  Face) does; lse, softmax and the loss are computed in fp32 from it. Chunks are large, so a 32 x 512 batch
  with 15% labels is one or two chunks.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import reference
from ._checks import check_tensor, compiling, interpreter_active, known_true, on_device, triton_usable
from ._compile_options import COMPILE_OPTIONS
from ._library import KernelCost, call, custom_op, nbytes, register_autograd, register_cost

# Most bytes one chunk of logits may take: 128 MiB is ~1,300 rows of fp16 logits at V = 50,265, large enough
# that the chunk GEMMs run at full tensor-core speed and small next to eager's [N, V] fp32 softmax copies.
CHUNK_BYTES = 128 * 2**20

# Columns a row program reads per step. On a GPU 4096 fp16 values are 16 per thread at 8 warps; the
# interpreter pays per operation, not per element, so it takes bigger steps (V = 50,265 is still 7 steps).
BLOCK_V = 8192 if interpreter_active() else 4096
ROW_ALIGN = 64  # elements; see _row_stride

# The 16-bit buffer holds the logit gradient as (softmax - onehot) * DZ_SCALE, in [-2**15, 2**15]: within fp16's
# 65,504, and softmax entries down to 2**-39 (fp16's smallest subnormal, 2**-24, over 2**15) survive.
# grad_output / n / DZ_SCALE is applied to the GEMMs' fp32 results (see the module docstring).
DZ_SCALE = 2.0 ** 15
# Rows of V per fp32 partial dW product when a second chunk adds to the first: the partial buffer is
# DW_SLICE_ROWS x E fp32 (25 MB at E = 768) instead of a second V x E one.
DW_SLICE_ROWS = 8192


@triton.jit
def _lse_step(z, start, m, s, arg):
    """Online log-sum-exp and argmax over one block of a row that starts at column ``start``."""
    block_max, block_arg = tl.max(z, axis=0, return_indices=True, return_indices_tie_break_left=True)
    # Strictly greater: on a tie the earlier block keeps the argmax, as torch.argmax does.
    arg = tl.where(block_max > m, start + block_arg, arg)
    m_new = tl.maximum(m, block_max)
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
    return m_new, s, arg


@triton.jit
def _lse_forward_kernel(
    Z, Labels, Lse, Loss, Correct,
    stride_z, V,
    BLOCK_V: tl.constexpr,
):
    """One program per row of the chunk: lse, loss = lse - z[label], and whether argmax(z) == label."""
    row = tl.program_id(0).to(tl.int64)  # rows * stride may pass 2**31 elements
    z_row = Z + row * stride_z
    label = tl.load(Labels + row).to(tl.int32)

    m = float("-inf")   # running max
    s = 0.0             # sum of exp(z - m) so far
    arg = 0             # index of the first maximum so far
    # Full blocks without a mask (whole-vector loads: the row stride is a multiple of 64 elements), then the
    # partial last block with one.
    v_full = (V // BLOCK_V) * BLOCK_V
    for start in range(0, v_full, BLOCK_V):
        z = tl.load(z_row + start + tl.arange(0, BLOCK_V)).to(tl.float32)
        m, s, arg = _lse_step(z, start, m, s, arg)
    if v_full < V:
        cols = v_full + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m, s, arg = _lse_step(z, v_full, m, s, arg)

    lse = m + tl.log(s)
    z_label = tl.load(z_row + label).to(tl.float32)
    tl.store(Lse + row, lse)
    tl.store(Loss + row, lse - z_label)
    tl.store(Correct + row, (arg == label).to(tl.int32))


@triton.jit
def _logits_grad_kernel(
    Z, Labels, Lse, Scale,
    stride_z, V,
    BLOCK_V: tl.constexpr,
):
    """One program per row: z <- (exp(z - lse) - onehot(label)) * scale, in place (scale: DZ_SCALE)."""
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    label = tl.load(Labels + row).to(tl.int32)
    lse = tl.load(Lse + row)
    scale = tl.load(Scale)
    v_full = (V // BLOCK_V) * BLOCK_V
    for start in range(0, v_full, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols).to(tl.float32)
        dz = (tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)) * scale
        tl.store(z_row + cols, dz.to(Z.dtype.element_ty))
    if v_full < V:
        cols = v_full + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(z_row + cols, mask=in_row, other=0.0).to(tl.float32)
        dz = (tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)) * scale
        tl.store(z_row + cols, dz.to(Z.dtype.element_ty), mask=in_row)


def _row_stride(V):
    """Row stride of the logits chunk buffer: V rounded up to 64 elements, so that every row starts 128-byte
    aligned and the kernels load whole vectors (V = 50,265 is odd: unpadded rows would be read 2 bytes at a
    time). The padding columns are never written or read."""
    return -(-V // ROW_ALIGN) * ROW_ALIGN


def _launch_config(V):
    block = min(BLOCK_V, triton.next_power_of_2(V))
    return block, (8 if block >= 2048 else 4)


def _chunk_logits(h, weight, bias, out):
    """z = h W^T + b written into ``out`` (a [rows, V] view of the chunk buffer)."""
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _mlm_cross_entropy_forward(h, weight, bias, targets, chunk_rows):
    """Launch the forward over rows that are all labelled: (mean loss fp32, num_correct int64, lse fp32 [n]).
    ``h`` [n, E], ``targets`` [n] in [0, V); ``chunk_rows`` <= 0 picks the default (``_default_chunk_rows``)."""
    n, V = h.shape[0], weight.shape[0]
    if chunk_rows <= 0:
        chunk_rows = _default_chunk_rows(n, V, h.element_size())
    lse = torch.empty(n, dtype=torch.float32, device=h.device)
    row_loss = torch.empty_like(lse)
    correct = torch.empty(n, dtype=torch.int32, device=h.device)
    block, num_warps = _launch_config(V)
    if n:
        buf = torch.empty(min(chunk_rows, n), _row_stride(V), dtype=h.dtype, device=h.device)[:, :V]
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            z = _chunk_logits(h[start:stop], weight, bias, buf[:stop - start])
            with on_device(h):
                _lse_forward_kernel[(stop - start,)](
                    z, targets[start:stop], lse[start:stop], row_loss[start:stop], correct[start:stop],
                    z.stride(0), V, BLOCK_V=block, num_warps=num_warps, **COMPILE_OPTIONS)
        del buf
        loss = row_loss.sum() / n
    else:
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
    return loss, correct.sum(dtype=torch.int64), lse


# torch.mm(..., out_dtype=) (16-bit inputs, fp32 output, one cuBLAS call) exists from torch 2.8 on; setup.py
# allows older torch, where the inputs are upcast instead (the same arithmetic, more memory traffic).
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype_out")  # the overload _mm_fp32 calls (out=)


def _mm_fp32(a, b, out):
    """out (fp32) = a @ b for a, b in the input dtype: summed in fp32 and never rounded to 16 bits. On CUDA (and
    on meta, where the step model counts what CUDA would run) one GEMM with an fp32 output; the CPU build has no
    16-bit x 16-bit -> fp32 GEMM, so there the inputs are upcast."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if _MM_OUT_DTYPE and a.device.type in ("cuda", "meta"):
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def _mlm_cross_entropy_backward(grad_loss, h, weight, bias, targets, lse, chunk_rows, need_h, need_w, need_b):
    """Launch the backward: (grad_h, grad_w, grad_b in fp32), None for each one not needed."""
    n, (V, E) = h.shape[0], weight.shape
    if chunk_rows <= 0:
        chunk_rows = _default_chunk_rows(n, V, h.element_size())
    dev, f32 = h.device, torch.float32
    grad_h = torch.empty(h.shape, dtype=h.dtype, device=dev) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=dev) if need_w and not n else None
    grad_b32 = torch.zeros(V, dtype=f32, device=dev) if need_b else None
    if n and (need_h or need_w or need_b):
        # Device tensors, not Python floats: reading grad_output on the host would sync every step.
        unscale = (grad_loss.to(f32) / (n * DZ_SCALE)).reshape(())
        dz_scale = torch.full((1,), DZ_SCALE, dtype=f32, device=dev)
        block, num_warps = _launch_config(V)
        rows = min(chunk_rows, n)
        buf = torch.empty(rows, _row_stride(V), dtype=h.dtype, device=dev)[:, :V]
        dh32 = torch.empty(rows, E, dtype=f32, device=dev) if need_h else None
        if need_w:
            grad_w32 = torch.empty(V, E, dtype=f32, device=dev)
            dw_part = torch.empty(min(DW_SLICE_ROWS, V), E, dtype=f32, device=dev) if n > rows else None
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            h_chunk = h[start:stop]
            dz = _chunk_logits(h_chunk, weight, bias, buf[:stop - start])
            with on_device(h):
                _logits_grad_kernel[(stop - start,)](
                    dz, targets[start:stop], lse[start:stop], dz_scale,
                    dz.stride(0), V, BLOCK_V=block, num_warps=num_warps, **COMPILE_OPTIONS)
            if need_h:
                torch.mul(_mm_fp32(dz, weight, dh32[:stop - start]), unscale, out=grad_h[start:stop])
            if need_w:
                if start == 0:  # the first chunk writes the fp32 accumulator, later ones add to it by slices
                    _mm_fp32(dz.t(), h_chunk, grad_w32)
                else:
                    for v0 in range(0, V, DW_SLICE_ROWS):
                        v1 = min(v0 + DW_SLICE_ROWS, V)
                        grad_w32[v0:v1] += _mm_fp32(dz[:, v0:v1].t(), h_chunk, dw_part[:v1 - v0])
            if need_b:
                grad_b32 += dz.sum(dim=0, dtype=f32)
        del buf, dh32  # before grad_w is allocated: the peak is the chunk loop's, not this
        if need_w:
            del dw_part
            grad_w = torch.mul(grad_w32, unscale, out=torch.empty(weight.shape, dtype=weight.dtype, device=dev))
        if need_b:
            grad_b32 *= unscale
    return grad_h, grad_w, grad_b32


# The custom ops (see _library.py). The forward also returns lse (fp32 [n]) for backward; num_correct is an
# integer output, so autograd never differentiates it.
@custom_op("mlm_cross_entropy")
def _mlm_cross_entropy_op(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          targets: torch.Tensor, chunk_rows: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _mlm_cross_entropy_forward(h, weight, bias, targets, chunk_rows)


@_mlm_cross_entropy_op.register_fake
def _(h, weight, bias, targets, chunk_rows):
    return (h.new_empty((), dtype=torch.float32), h.new_empty((), dtype=torch.int64),
            h.new_empty(h.shape[:1], dtype=torch.float32))


@custom_op("mlm_cross_entropy_backward")
def _mlm_cross_entropy_backward_op(grad_loss: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                                   bias: Optional[torch.Tensor], targets: torch.Tensor, lse: torch.Tensor,
                                   chunk_rows: int, need_h: bool, need_w: bool, need_b: bool
                                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _mlm_cross_entropy_backward(grad_loss, h, weight, bias, targets, lse, chunk_rows, need_h, need_w,
                                        need_b)
    # Custom ops return tensors: a gradient not asked for is an empty one (the autograd formula drops it).
    return tuple(h.new_empty(0) if g is None else g for g in grads)


@_mlm_cross_entropy_backward_op.register_fake
def _(grad_loss, h, weight, bias, targets, lse, chunk_rows, need_h, need_w, need_b):
    return (h.new_empty(h.shape if need_h else (0,)), weight.new_empty(weight.shape if need_w else (0,)),
            h.new_empty(weight.shape[:1] if need_b else (0,), dtype=torch.float32 if need_b else h.dtype))


def _mlm_cross_entropy_setup(ctx, inputs, output):
    h, weight, bias, targets, chunk_rows = inputs
    ctx.save_for_backward(h, weight, bias, targets, output[2])
    ctx.chunk_rows = chunk_rows
    ctx.set_materialize_grads(False)  # lse's gradient stays None, not a zeros tensor


def _mlm_cross_entropy_grad(ctx, grad_loss, _grad_num_correct, _grad_lse):
    if grad_loss is None:
        return (None,) * 5
    h, weight, bias, targets, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and bias is not None
    grad_h, grad_w, grad_b = call(_mlm_cross_entropy_backward_op, grad_loss, h, weight, bias, targets, lse,
                                  ctx.chunk_rows, need_h, need_w, need_b)
    return (grad_h if need_h else None, grad_w if need_w else None, grad_b.to(bias.dtype) if need_b else None,
            None, None)


register_autograd(_mlm_cross_entropy_op, _mlm_cross_entropy_grad, _mlm_cross_entropy_setup)


# What the launch code runs on a GPU (see _library.COSTS), chunk by chunk: the logits GEMMs count as GEMM (as
# an unfused head's decoder GEMM does), the kernels over the [rows, V] logits chunk as loss.
def _chunks(h, weight, chunk_rows):
    n, V = h.shape[0], weight.shape[0]
    if chunk_rows <= 0:
        chunk_rows = _default_chunk_rows(n, V, h.element_size())
    return [min(chunk_rows, n - start) for start in range(0, n, chunk_rows)]


@register_cost("mlm_cross_entropy")
def _mlm_cross_entropy_cost(h, weight, bias, targets, chunk_rows):
    V, E, s = weight.shape[0], weight.shape[1], h.element_size()
    kernels = []
    for rows in _chunks(h, weight, chunk_rows):
        z = rows * V * s
        kernels += [KernelCost("ce_logits_addmm", "GEMM", 2 * rows * V * E, rows * E * s + nbytes(weight)
                               + nbytes(bias), z),
                    KernelCost("ce_lse_fwd", "loss", 0, z + rows * targets.element_size(), rows * 12)]
    n = h.shape[0]
    return kernels + [KernelCost("ce_loss_sum", "loss", 0, 4 * n, 4), KernelCost("ce_correct_sum", "loss", 0, 4 * n, 8)]


@register_cost("mlm_cross_entropy_backward")
def _mlm_cross_entropy_backward_cost(grad_loss, h, weight, bias, targets, lse, chunk_rows, need_h, need_w, need_b):
    n, V, E, s = h.shape[0], weight.shape[0], weight.shape[1], h.element_size()
    if not n:
        return ([KernelCost("ce_zero_dweight", "loss", 0, 0, nbytes(weight))] if need_w else []) + (
            [KernelCost("ce_zero_dbias", "loss", 0, 0, 4 * V)] if need_b else [])
    kernels = [KernelCost("ce_unscale", "loss", 0, 4, 4), KernelCost("ce_dz_scale", "loss", 0, 0, 4)]
    if need_b:
        kernels.append(KernelCost("ce_zero_dbias", "loss", 0, 0, 4 * V))
    for i, rows in enumerate(_chunks(h, weight, chunk_rows)):
        z, hc = rows * V * s, rows * E * s
        kernels += [KernelCost("ce_logits_addmm", "GEMM", 2 * rows * V * E, hc + nbytes(weight) + nbytes(bias), z),
                    KernelCost("ce_logits_grad", "loss", 0, z + rows * 8 + 4, z)]
        if need_h:  # fp32 product, then scaled and rounded into grad_h
            kernels += [KernelCost("ce_dhidden_mm", "GEMM", 2 * rows * V * E, z + nbytes(weight), 4 * rows * E),
                        KernelCost("ce_dhidden_unscale", "loss", 0, 4 * rows * E + 4, hc)]
        if need_w and i == 0:
            kernels.append(KernelCost("ce_dweight_mm", "GEMM", 2 * rows * V * E, z + hc, 4 * V * E))
        elif need_w:
            for v0 in range(0, V, DW_SLICE_ROWS):
                vs = min(DW_SLICE_ROWS, V - v0)
                kernels += [KernelCost("ce_dweight_mm", "GEMM", 2 * rows * vs * E, rows * vs * s + hc, 4 * vs * E),
                            KernelCost("ce_dweight_add", "loss", 0, 8 * vs * E, 4 * vs * E)]
        if need_b:
            kernels += [KernelCost("ce_dbias_sum", "loss", 0, z, 4 * V), KernelCost("ce_dbias_add", "loss", 0, 8 * V, 4 * V)]
    if need_w:
        kernels.append(KernelCost("ce_dweight_unscale", "loss", 0, 4 * V * E + 4, nbytes(weight)))
    if need_b:
        kernels.append(KernelCost("ce_dbias_unscale", "loss", 0, 4 * V + 4, 4 * V))
    return kernels


def _default_chunk_rows(n, V, itemsize):
    """Rows per chunk: as many as fit in CHUNK_BYTES, then evened out over the chunks that takes."""
    max_rows = max(1, CHUNK_BYTES // (_row_stride(V) * itemsize))
    n_chunks = max(1, -(-n // max_rows))
    return max(1, -(-n // n_chunks))


def mlm_cross_entropy(hidden, weight, bias, labels, ignore_index=-100, return_num_correct=False, *,
                      chunk_rows=None, validate=True, labelled_rows_only=False):
    """Mean cross-entropy of ``hidden @ weight.T + bias`` over the rows whose label != ``ignore_index``.

    hidden [N, E] and weight [V, E] (the tied word embeddings) of one floating dtype, bias [V] or None,
    labels [N] integer class ids in [0, V) or ``ignore_index``. Returns the loss as an fp32 scalar (0.0 with
    zero gradients when no row is labelled), and with ``return_num_correct`` also the int64 count of labelled
    rows whose argmax is the label. ``chunk_rows`` overrides how many labelled rows share one chunk of logits
    (default: as many as fit in ``CHUNK_BYTES``). Runs the Triton kernels where ``triton_usable(hidden)``,
    the eager reference otherwise.

    Host syncs: ``validate=True`` checks the label range on the host (one sync on CUDA); selecting the
    labelled rows costs another. A caller that has checked the labels (``validate=False``) and already kept
    only labelled rows (``labelled_rows_only=True``: every label is in [0, V)) makes none. Under
    ``torch.compile`` the label-range check is skipped (a host read would break the graph; type, dtype, shape
    and device checks always run), and selecting the labelled rows needs
    ``torch._dynamo.config.capture_dynamic_output_shape_ops`` (``fastroberta.compile_model`` sets it).
    """
    check_tensor("hidden", hidden, ndim=2)
    dev = hidden.device
    check_tensor("weight", weight, ndim=2, device=dev)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}; cast them to one dtype")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [vocab_size, {hidden.shape[1]}] to match hidden "
                         f"{tuple(hidden.shape)}")
    V = weight.shape[0]
    if V == 0:
        raise ValueError("weight has no rows: the vocabulary is empty")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=dev)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but hidden has {hidden.dtype}; cast them to one dtype")
        if bias.shape[0] != V:
            raise ValueError(f"bias has shape {tuple(bias.shape)} but weight has {V} rows (vocab_size)")
    check_tensor("labels", labels, dtypes=None, ndim=1, device=dev)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer class ids, got dtype {labels.dtype}")
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but hidden has {hidden.shape[0]} rows")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")

    if validate and not compiling():  # a host read: it would break a torch.compile graph
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bad.any():
            raise ValueError(f"label {int(labels[bad][0])} is outside the vocabulary [0, {V}) and is not "
                             f"ignore_index ({ignore_index})")

    if not triton_usable(hidden):
        # F.cross_entropy takes int64 targets only; the kernels take any integer dtype.
        return reference.mlm_cross_entropy(hidden, weight, bias, labels.long(), ignore_index=ignore_index,
                                           return_num_correct=return_num_correct)

    if labelled_rows_only:
        n = hidden.shape[0]
    else:
        rows = (labels != ignore_index).nonzero().squeeze(1)
        n = rows.numel()
    if known_true(n == hidden.shape[0]):
        h, targets = hidden, labels.contiguous()  # the kernels index labels with stride 1
    else:
        h, targets = hidden.index_select(0, rows), labels.index_select(0, rows)
    # chunk_rows 0: the op picks the default from the row count (which under torch.compile may be known only
    # when the op runs).
    loss, num_correct, _ = call(_mlm_cross_entropy_op, h, weight, bias, targets, chunk_rows or 0)
    return (loss, num_correct) if return_num_correct else loss
