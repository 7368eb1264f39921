"""Bidirectional flash attention with a key-padding mask, variable-length (packed) batches and dropout.

For one head of one sequence, with queries q_i, keys k_j, values v_j (rows of length D), scale
s = softmax_scale (default 1/sqrt(D)), the set R of real (unmasked) tokens, and a dropout keep mask
Z_ij ~ Bernoulli(1 - p):

    S_ij   = s * q_i . k_j                                     for j in R, -inf otherwise
    LSE_i  = log sum_j exp(S_ij)                               (fp32)
    P_ij   = exp(S_ij - LSE_i)
    O_i    = sum_j P_ij Z_ij / (1 - p) v_j                     for i in R;  O_i = 0 for a padded query
                                                               or a query with no real key

which is ``reference.attention``. The backward pass (FlashAttention-2) recomputes P from the stored LSE:

    Delta_i = dO_i . O_i    (= sum_j P_ij dP_ij, dropout included)
    dV_j    = sum_i P_ij Z_ij / (1 - p) dO_i
    dP_ij   = Z_ij / (1 - p) dO_i . v_j
    dS_ij   = P_ij (dP_ij - Delta_i)
    dQ_i    = s sum_j dS_ij k_j,      dK_j = s sum_i dS_ij q_i

Layout. ``attention`` takes q, k, v [B, H, L, D] with any strides whose last one is 1 and a [B, L] mask of
any 0/1 pattern. ``attention_packed`` takes the fused projection qkv [B, L, 3, H, D] (what the model has) and
returns its gradient as one tensor, the backward kernels writing dQ, dK, dV into strided views of it.
``attention_varlen`` takes packed [total_tokens, H, D] tensors and int32 ``cu_seqlens`` (sequence b is
tokens cu_seqlens[b]:cu_seqlens[b+1]).
All three run the same kernels: a program finds its sequence's first token and length (``_sequence``), then works
on token positions inside that sequence. In the padded form the length is the position of the last real
token + 1, so the blocks past each row's trailing padding are skipped; padding in the middle (holes) is
masked key by key. Scores never leave the chip; the forward pass stores O and the fp32 LSE only.

Rows that cannot attend (padded queries, rows whose keys are all padding) get LSE = +inf, so the
recomputed P is exactly 0 in backward and their gradients are zero, never NaN.

Right-padded rows (every real token before every padding one: what full- and doc-sentence packing give)
need no per-key mask: the host marks each row's length as with or without holes, on the device, and the
kernels branch on that per sequence, so only rows with holes load the mask inside their loops.

Dropout uses every bit of each Philox4x32-7 call (7 rounds, ``DROPOUT_PHILOX_ROUNDS`` says why): keyed by
(seed, sequence * H + head) and counted by (key group, query pair) (positions inside the sequence), one call
gives four 32-bit words, eight 16-bit halves that decide eight (query, key) pairs by an integer comparison
with round(p * 65536) (so the keep probability is 1 - p to within 2**-17). The eight pairs are ones a thread
of the sm_90 tensor-core accumulator holds in the forward and dQ kernels' [queries, keys] tiles, so the
compiler evaluates each call once per eight elements and no mask moves between threads (``_dropout_keep``
has the exact mapping); the dK/dV kernel's transposed tiles split a call's pairs between two threads (keys
j and j + 1), so the mapping gives the pairs of one key parity whole words, and ``_dropout_keep_t``
evaluates each call once and sends each word, unchanged, through shared memory to the thread that needs it.
The loops mask without scaling; the factor 1 / (1 - p) is applied once per output row (forward, dQ) or key
(dK, dV).
Backward regenerates the forward's mask, and the padded and varlen forms drop the same entries of
right-padded data. Sequences are limited to 32768 tokens with dropout. The seed is drawn per
call from torch's generator of the inputs' device (``_checks.new_dropout_seed``) into a one-element tensor
that the custom op passes to the kernels, which read it from memory: nothing reads it on the host.
"""
import math
import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import reference
from ._checks import (FLOAT_DTYPES, check_tensor, compiling, dropout_seed_for, interpreter_active, known_empty,
                      on_device, triton_usable)
from ._compile_options import COMPILE_OPTIONS
from ._library import (KernelCost, call, cdiv, custom_op, nbytes, next_power_of_2, register_autograd,
                       register_cost)

HEAD_DIMS = (16, 32, 64, 128)
DROPOUT_MAX_SEQLEN = 32768
# Rounds of the Philox4x32 generator behind the attention dropout masks: 7, the fewest that Salmon et al.
# (SC 2011) found to pass TestU01's BigCrush for Philox4x32 (10 is their default, with a margin; 7 is what
# FlashAttention-2's dropout runs). Each round costs about four SASS instructions per call (a call decides
# eight attention entries), so 7 instead of 10 takes ~12 instructions off every call in the kernels' loops.
# tests/test_dropout_rng.py checks the masks against an independent Philox4x32-7 and their statistics.
DROPOUT_PHILOX_ROUNDS = tl.constexpr(7)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# FASTROBERTA_AUTOTUNE=0 (read at import): every launch runs its default config, chosen on the host by
# ``_launch``; Triton's autotuner never benchmarks (Triton 3.6 benchmarks even a single surviving config,
# allocating a 256 MiB L2-flush buffer through torch).
AUTOTUNE = os.environ.get("FASTROBERTA_AUTOTUNE", "1") != "0"


def _configs(interpreter, defaults, candidates):
    """One fixed config under the interpreter (no sweep). On GPU a default per input class (``defaults``:
    "d64" = fp16/bf16 with head dim <= 64, "d128" = fp16/bf16 at 128, "fp32"), then the candidates to
    autotune over unless FASTROBERTA_AUTOTUNE=0; ``_prune`` picks a launch's default (and candidates)."""
    def cfg(m, n, warps, stages, default_for=None):
        c = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
        c.default_for = default_for
        return c
    if interpreter_active():
        return [cfg(*interpreter, 1, 1)]
    configs = [cfg(*c, default_for=kind) for kind, c in defaults.items()]
    if AUTOTUNE:
        configs += [cfg(*c) for c in candidates]
    return configs


# (interpreter (BLOCK_M, BLOCK_N)), then GPU defaults and candidates (BLOCK_M, BLOCK_N, num_warps, num_stages).
# BLOCK_M always counts queries and BLOCK_N keys; the interpreter's blocks differ so that tests catch a mixed-up
# index. The defaults keep every loop free of register spills on sm_90 with dropout on or off (what
# `python -m benchmarks static` checks): at head dim 128 the fp32 accumulators need 8 warps (or smaller tiles)
# where 4 warps spill hundreds of bytes in the loop; the forward's 128 x 64 tiles take 8 warps at head dim 64
# too, where 4 warps (an autotune candidate) use all 255 registers and spill inside the loop of the
# key-mask kernel with dropout.
_FWD_CONFIGS = _configs((64, 32), {"d64": (128, 64, 8, 3), "d128": (128, 64, 8, 3), "fp32": (64, 32, 4, 2)},
                        [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4), (64, 32, 4, 3)])
_DKDV_CONFIGS = _configs((32, 64), {"d64": (64, 128, 8, 3), "d128": (32, 128, 8, 3), "fp32": (32, 64, 4, 2)},
                         [(32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3), (16, 64, 4, 2)])
_DQ_CONFIGS = _configs((64, 32), {"d64": (128, 32, 4, 3), "d128": (128, 32, 8, 3), "fp32": (64, 32, 4, 2)},
                       [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2)])
_AUTOTUNE_KEY = ["seqlen_bucket", "HEAD_DIM", "VARLEN", "HAS_MASK", "HAS_SEQLENS", "DROPOUT"]


def _prune(configs, named_args, **kwargs):
    """Autotune pruning: the launch's default first, then the candidates; fp32 runs its default only.

    fp32 tiles are small (64 x 32 / 32 x 64, 4 warps): exact fp32 dots (``fp32_dot_precision`` "ieee") lower
    to plain FMAs that spill 1-2 KB per thread in every loop at any tile size on sm_90 (measured with `python
    -m benchmarks static`), and fp32 tiles take twice fp16's shared memory, so the larger candidates could
    exceed an H100 block's 227 KiB."""
    if named_args["Q"].dtype == torch.float32:
        kind = "fp32"
    else:
        kind = "d64" if kwargs["HEAD_DIM"] <= 64 else "d128"
    default = [c for c in configs if getattr(c, "default_for", None) == kind]
    if kind == "fp32":
        return default
    return default + [c for c in configs if getattr(c, "default_for", None) is None]


_PRUNE = {"early_config_prune": _prune}


def _launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` for an autotuned kernel; without autotuning (FASTROBERTA_AUTOTUNE=0,
    or the interpreter's single config) the launch's default config, picked by ``_prune`` as the autotuner
    would, goes straight to the jitted function: nothing is benchmarked."""
    if len(kernel.configs) == 1:
        config = kernel.configs[0]
    elif AUTOTUNE:
        return kernel[grid](*args, **kwargs, **COMPILE_OPTIONS)
    else:
        config = _prune(kernel.configs, dict(zip(kernel.arg_names, args)), **kwargs)[0]
    return kernel.fn[grid](*args, **kwargs, **config.all_kwargs(), **COMPILE_OPTIONS)


def fp32_dot_precision():
    """How fp32 attention multiplies on a GPU, following torch's switch for fp32 matmuls: "tf32" (tensor cores,
    10-bit mantissa, fp32 accumulation; about 1e-3 relative error per dot, so an output error that grows with
    the scores' magnitude) where torch allows TF32 (``torch.backends.cuda.matmul.allow_tf32 = True``,
    ``torch.set_float32_matmul_precision("high")`` or ``torch.backends.cuda.matmul.fp32_precision = "tf32"``),
    "ieee" (exact fp32 products, slower: the dots become FMAs that spill registers) otherwise, torch's default.
    Read at each launch, so forward and backward of one call follow the setting of the moment. fp16/bf16
    attention is unaffected, and under the interpreter the dots are exact fp32 whatever this says."""
    matmul = torch.backends.cuda.matmul
    try:  # torch >= 2.9; reading allow_tf32 raises once fp32_precision has been set
        precision = matmul.fp32_precision
        if precision == "none":  # not set for CUDA matmuls: the generic setting decides
            precision = torch.backends.fp32_precision
        return "tf32" if precision == "tf32" else "ieee"
    except AttributeError:
        return "tf32" if matmul.allow_tf32 else "ieee"


@triton.jit
def _sequence(CuSeqlens, SeqLens, b, seq_len, VARLEN: tl.constexpr, HAS_SEQLENS: tl.constexpr):
    """(first token, attended length, stored rows, has holes) of sequence b. Padded rows past the attended
    length still get zeros written in the padded form; in the varlen form they belong to the next sequence.
    SeqLens holds the attended length, negated when the row's mask has holes (padding before its last real
    token): only those rows need the per-key mask."""
    if VARLEN:
        start = tl.load(CuSeqlens + b)
        seqlen = tl.load(CuSeqlens + b + 1) - start
        store_len = seqlen
        holes = seqlen < 0
    else:
        start = b * 0
        if HAS_SEQLENS:
            code = tl.load(SeqLens + b)
            seqlen = tl.abs(code)
            holes = code < 0
        else:
            seqlen = b * 0 + seq_len
            holes = seqlen < 0
        store_len = b * 0 + seq_len
    return start, seqlen, store_len, holes


@triton.jit
def _dropout_seed(Seed, DROPOUT: tl.constexpr):
    """The kernel's dropout seed, 0 without dropout. It is read from memory (Seed: a one-element int64 tensor
    on the device), not passed by value: a captured CUDA graph replays with the seed its caller draws into
    that tensor each step."""
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    return seed


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1, N_ROUNDS: tl.constexpr):
    """Philox4x32 (Salmon et al. 2011) on uint32 counter words c0..c3 and uint32 scalar key words k0, k1:
    bit for bit ``tl.philox``, but each round's two 32 x 32 -> 64-bit products are taken as one widening
    multiply (one IMAD.WIDE.U32 on sm_90) instead of separate high and low halves (IMAD.HI + IMAD), except
    in round three (see below)."""
    for r in tl.static_range(N_ROUNDS):
        # The round keys, in 64 bits so that nothing overflows (r is a compile-time constant).
        rk0 = ((k0.to(tl.uint64) + r * 0x9E3779B9) & 0xFFFFFFFF).to(tl.uint32)
        rk1 = ((k1.to(tl.uint64) + r * 0xBB67AE85) & 0xFFFFFFFF).to(tl.uint32)
        # Round three multiplies values that round two left as a product's high half XORed with a round key
        # (the counter words it XORs are still 0). Written as a 64-bit product, the compiler then keeps that
        # XOR in 64 bits and multiplies in 64 bits (three instructions and a uniform move per product where
        # one widening multiply would do); a 32-bit high and low product avoids it. Per the static report,
        # forward 521 -> 511, dQ 450 -> 446 and dK/dV 560 -> 565 loop instructions at head dim 64.
        if r == 2:
            hi_a = tl.umulhi(c0, 0xD2511F53)
            hi_b = tl.umulhi(c2, 0xCD9E8D57)
            lo_a = c0 * 0xD2511F53
            lo_b = c2 * 0xCD9E8D57
        else:
            prod_a = c0.to(tl.uint64) * 0xD2511F53
            prod_b = c2.to(tl.uint64) * 0xCD9E8D57
            hi_a = (prod_a >> 32).to(tl.uint32)
            hi_b = (prod_b >> 32).to(tl.uint32)
            lo_a = prod_a.to(tl.uint32)
            lo_b = prod_b.to(tl.uint32)
        c0 = hi_b ^ c1 ^ rk0
        c2 = hi_a ^ c3 ^ rk1
        c1 = lo_b
        c3 = lo_a
    return c0, c1, c2, c3


@triton.jit
def _dropout_keep(seed, bh, row0, offs_m, col0, offs_n, dropout_p):
    """Keep mask [queries, keys] of the queries row0 + offs_m x the keys col0 + offs_n (row0 and col0
    multiples of the block sizes, which are multiples of 16); ``_dropout_keep_t`` gives the same mask
    transposed, for the dK/dV kernel's [keys, queries] tiles.

    For query i and key j, one Philox4x32-7 call (``DROPOUT_PHILOX_ROUNDS``) keyed by (seed, sequence * H +
    head) with the counter (0, 4 * (j // 16) + (j // 2) % 4, 0, i - (i & 8)) gives four 32-bit words, eight
    16-bit halves, for the eight (query, key) pairs that share the counter: pair (i, j) takes the half
    (i // 8) % 2 of word 2 * ((j // 8) % 2) + j % 2 and is kept when that half is >= round(p * 65536) (so
    in the dK/dV kernel's tiles, whose threads hold keys j or j + 1, each thread needs whole words). Those
    eight pairs are ones that one thread of an sm_90 tensor-core accumulator holds in registers (all eight
    in the [queries, keys] tiles, four in the transposed ones), so the Philox calls of a thread's tile
    elements coincide and the compiler computes each once; no keep mask moves between threads.

    The key group and the query pair sit in the counter words that Philox's first round only XORs with the
    key (c1 and c3, the multiplied words c0 and c2 being 0): its second round then multiplies a value of
    the keys alone and one of the queries alone, so rounds one and two are computed once per key group and
    once per query pair (outside the loop for whichever of the two a kernel's loop keeps fixed), never per
    call, and no product of a loop counter is left for the compiler to turn into 64-bit running sums."""
    threshold = tl.minimum(dropout_p * 65536.0 + 0.5, 65535.0).to(tl.uint32) << 16
    # row0 and col0 are multiples of the block sizes, so "|" adds. Written with "+", the counters come out
    # of the compiler costing about 20 instructions more per Philox call (measured with the static report).
    group = ((col0 // 4) | ((offs_n // 16) * 4 + (offs_n // 2) % 4)).to(tl.uint32)
    row = (row0 | (offs_m - (offs_m & 8))).to(tl.uint32)
    key_word = ((offs_n // 8) % 2) * 2 + offs_n % 2
    high_half = (offs_m // 8) % 2 == 1
    c1 = group[None, :] + (row * 0)[:, None]
    c3 = row[:, None] + (group * 0)[None, :]
    word_of = key_word[None, :] + (row * 0)[:, None]
    high_half = high_half[:, None]
    zero = c1 * 0
    w0, w1, w2, w3 = _philox(zero, c1, zero, c3, seed.to(tl.uint32), bh.to(tl.uint32), DROPOUT_PHILOX_ROUNDS)
    word = tl.where(word_of < 2, tl.where(word_of == 0, w0, w1), tl.where(word_of == 2, w2, w3))
    # The low half is compared rotated up, not shifted: w1 and w3 are low halves of Philox products, and a
    # shift (or a mask) needs only the product's low 16 bits, so the compiler computes those with a second,
    # narrower multiply instead of reusing the widening one: 16 instructions more per loop iteration of the
    # forward and dQ kernels (static report). A rotation needs every bit and is one SHF.L.W.
    return tl.where(high_half, word, (word << 16) | (word >> 16)) >= threshold


@triton.jit
def _dropout_keep_t(seed, bh, row0, col0, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The transpose of ``_dropout_keep(seed, bh, row0, arange(BLOCK_M), col0, arange(BLOCK_N), dropout_p)``:
    the keep mask [BLOCK_N keys, BLOCK_M queries] of the dK/dV kernel's transposed tiles.

    In those tiles a thread of the sm_90 accumulator holds keys j or j + 1, not both, so only four of a
    Philox call's eight pairs: evaluated per element, as ``_dropout_keep`` does, each call would be
    computed by two threads. Here each call is evaluated once, on a compact [BLOCK_M / 2 query pairs,
    BLOCK_N / 4 key groups] grid, and reshapes send its words 2 e + j % 2 (e = (j // 8) % 2) to the thread
    of key j, whole (the mapping gives keys of one parity whole words), which the compiler does with one
    pass through shared memory in 128-bit stores and loads. (With the key groups first on the compact grid
    each thread would compute one query pair's part of Philox's second and third rounds instead of four,
    but the stores and loads go word by word: more instructions in all, per the static report.)"""
    threshold = tl.minimum(dropout_p * 65536.0 + 0.5, 65535.0).to(tl.uint32) << 16
    r = tl.arange(0, BLOCK_M // 2)  # 8 * (i // 16) + i % 8 of query i
    g = tl.arange(0, BLOCK_N // 4)  # 4 * (j // 16) + (j // 2) % 4 of key j
    group = ((col0 // 4) | g).to(tl.uint32)
    row = (row0 | ((r // 8) * 16 + r % 8)).to(tl.uint32)
    c1 = group[None, :] + (row * 0)[:, None]
    c3 = row[:, None] + (group * 0)[None, :]
    zero = c1 * 0
    w0, w1, w2, w3 = _philox(zero, c1, zero, c3, seed.to(tl.uint32), bh.to(tl.uint32), DROPOUT_PHILOX_ROUNDS)
    x = tl.join(tl.join(w0, w1), tl.join(w2, w3))  # word 2 e + j % 2: [r, g, j % 2, e]
    # [i // 16, i % 8, j // 16, (j // 2) % 4, j % 2, e]
    x = tl.reshape(x, (BLOCK_M // 16, 8, BLOCK_N // 16, 4, 2, 2))
    x = tl.permute(x, (2, 5, 3, 4, 0, 1))  # [j // 16, e, (j // 2) % 4, j % 2, i // 16, i % 8]
    # One word decides queries i and i + 8, with its low and its high half.
    x = tl.broadcast_to(x[:, :, :, :, :, None, :], (BLOCK_N // 16, 2, 4, 2, BLOCK_M // 16, 2, 8))
    x = tl.reshape(x, (BLOCK_N, BLOCK_M))
    high_half = ((tl.arange(0, BLOCK_M) // 8) % 2 == 1)[None, :]
    return tl.where(high_half, x, x << 16) >= threshold


# ---------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K, V, KeyMask, stride_kn, stride_vn, start_n, seqlen,
              offs_m, offs_n, offs_d, qk_scale, dropout_p, seed, bh, row0,
              BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = start_n + offs_n
    kT_ptrs = K + cols[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = V + cols[:, None] * stride_vn + offs_d[None, :]
    if BOUNDS:
        kT = tl.load(kT_ptrs, mask=(cols < seqlen)[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=(cols < seqlen)[:, None], other=0.0)
    else:
        kT = tl.load(kT_ptrs)
        v = tl.load(v_ptrs)
    # Scores in log2 units: exp2 is the native instruction.
    s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
    if BOUNDS:
        s = tl.where((cols < seqlen)[None, :], s, float("-inf"))
    if HAS_MASK:
        real_key = tl.load(KeyMask + cols, mask=cols < seqlen, other=0) != 0
        s = tl.where(real_key[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no real key yet has max -inf; shift by 0 instead so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, row0, offs_m - row0, start_n, offs_n, dropout_p)
        # A zero the compiler cannot see (dropout_p is finite): with a constant 0 it moves the select past
        # the conversion to 16 bits, onto packed pairs that it then has to take apart and put together.
        p = tl.where(keep, p, dropout_p * 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, K, V, KeyMask, stride_kn, stride_vn, hi, seqlen,
                offs_m, offs_n, offs_d, qk_scale, dropout_p, seed, bh, row0,
                HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key blocks 0 .. hi: the full ones in a loop without bounds checks, then the partial one."""
    hi_full = (hi // BLOCK_N) * BLOCK_N
    for start_n in range(0, hi_full, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, KeyMask, stride_kn, stride_vn, start_n, seqlen,
                                  offs_m, offs_n, offs_d, qk_scale, dropout_p, seed, bh, row0,
                                  False, HAS_MASK, DROPOUT, PRECISION, BLOCK_N)
    if hi_full < hi:
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, KeyMask, stride_kn, stride_vn, hi_full, seqlen,
                                  offs_m, offs_n, offs_d, qk_scale, dropout_p, seed, bh, row0,
                                  True, HAS_MASK, DROPOUT, PRECISION, BLOCK_N)
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KeyMask, SeqLens, CuSeqlens,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
              stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_mb,
              num_heads, seq_len, max_seqlen, softmax_scale, dropout_p, Seed, seqlen_bucket,
              HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEQLENS: tl.constexpr,
              DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program per (query block, sequence, head); query blocks of one head are neighbours so that they
    # share K/V in L2. A 1-D grid has no 65535 limit on sequences x heads.
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0, "_dropout_keep needs blocks of 16")
    seed = _dropout_seed(Seed, DROPOUT)
    num_m_blocks = tl.cdiv(max_seqlen, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = bh // num_heads
    h = bh % num_heads
    start, seqlen, store_len, holes = _sequence(CuSeqlens, SeqLens, b, seq_len, VARLEN, HAS_SEQLENS)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    t64 = start.to(tl.int64)
    Q += b64 * stride_qb + h64 * stride_qh + t64 * stride_qm
    K += b64 * stride_kb + h64 * stride_kh + t64 * stride_kn
    V += b64 * stride_vb + h64 * stride_vh + t64 * stride_vn
    O += b64 * stride_ob + h64 * stride_oh + t64 * stride_om
    LSE += b64 * stride_lb + h64 * stride_lh + t64
    if HAS_MASK:
        KeyMask += b64 * stride_mb

    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_seq = offs_m < seqlen
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=in_seq[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = softmax_scale * LOG2E
    # A block past the sequence's end does no work; it only writes its zeros (padded form).
    hi = tl.where(pid_m * BLOCK_M < seqlen, seqlen, 0)
    if HAS_MASK:
        # Only a row with holes reads the mask key by key; a right-padded one runs on its length alone.
        if holes:
            acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, KeyMask, stride_kn, stride_vn, hi, seqlen,
                                        offs_m, offs_n, offs_d, qk_scale, dropout_p, seed, bh, row0,
                                        True, DROPOUT, PRECISION, BLOCK_N)
        else:
            acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, KeyMask, stride_kn, stride_vn, hi, seqlen,
                                        offs_m, offs_n, offs_d, qk_scale, dropout_p, seed, bh, row0,
                                        False, DROPOUT, PRECISION, BLOCK_N)
    else:
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, KeyMask, stride_kn, stride_vn, hi, seqlen,
                                    offs_m, offs_n, offs_d, qk_scale, dropout_p, seed, bh, row0,
                                    False, DROPOUT, PRECISION, BLOCK_N)

    row_ok = in_seq
    if HAS_MASK:
        row_ok = row_ok & (tl.load(KeyMask + offs_m, mask=in_seq, other=0) != 0)
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    if DROPOUT:
        out_scale = 1.0 / (1.0 - dropout_p) / l_safe
    else:
        out_scale = 1.0 / l_safe
    o = tl.where(row_ok[:, None], acc * out_scale[:, None], 0.0)
    lse = tl.where(row_ok & has_key, (m_i + tl.math.log2(l_safe)) * LN2, float("inf"))
    stored = offs_m < store_len
    tl.store(O + offs_m[:, None] * stride_om + offs_d[None, :], o.to(O.dtype.element_ty), mask=stored[:, None])
    tl.store(LSE + offs_m, lse, mask=stored)


# ---------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess(O, DO, Delta, SeqLens, CuSeqlens,
                    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_lb, stride_lh,
                    num_heads, seq_len, max_seqlen, delta_scale,
                    HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, HAS_SEQLENS: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """Delta_i = delta_scale * (dO_i . O_i) in fp32, for every stored row (zero rows of O give 0).

    delta_scale is 1 - p with dropout (the backward loops compute (1 - p) times dS, see ``_bwd_dkdv_tile``),
    1 without: scaled here once per row, not in every tile of the two loops that read it."""
    num_m_blocks = tl.cdiv(max_seqlen, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = bh // num_heads
    h = bh % num_heads
    start, seqlen, store_len, holes = _sequence(CuSeqlens, SeqLens, b, seq_len, VARLEN, HAS_SEQLENS)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    t64 = start.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    stored = offs_m < store_len
    o = tl.load(O + b64 * stride_ob + h64 * stride_oh + t64 * stride_om
                + offs_m[:, None] * stride_om + offs_d[None, :], mask=stored[:, None], other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + t64 * stride_dom
                 + offs_m[:, None] * stride_dom + offs_d[None, :], mask=stored[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) * delta_scale
    tl.store(Delta + b64 * stride_lb + h64 * stride_lh + t64 + offs_m, delta, mask=stored)


@triton.jit
def _bwd_dkdv_tile(dk, dv, k, v, Q, DO, LSE, Delta, stride_qm, stride_dom, start_m, seqlen,
                   offs_m, cols, offs_d, qk_scale, dropout_p, seed, bh, col0,
                   BOUNDS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Works on transposed tiles (keys x queries) so that dK and dV accumulate with plain dots.
    rows = start_m + offs_m
    qT_ptrs = Q + rows[None, :] * stride_qm + offs_d[:, None]
    do_ptrs = DO + rows[:, None] * stride_dom + offs_d[None, :]
    if BOUNDS:
        in_seq = rows < seqlen
        qT = tl.load(qT_ptrs, mask=in_seq[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=in_seq[:, None], other=0.0)
        lse = tl.load(LSE + rows, mask=in_seq, other=float("inf"))
        delta = tl.load(Delta + rows, mask=in_seq, other=0.0)
    else:
        qT = tl.load(qT_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(LSE + rows)
        delta = tl.load(Delta + rows)
    # LSE = +inf marks a row that attends to nothing: its probabilities come out exactly 0.
    pT = tl.math.exp2(tl.dot(k, qT, input_precision=PRECISION) * qk_scale - (lse * LOG2E)[None, :])
    # With dropout the loop leaves out the factor 1 / (1 - p) of kept entries: dV and dK accumulate
    # (1 - p) times their value (Delta comes in as (1 - p) Delta, from _bwd_preprocess), and the kernel
    # scales both once at the end.
    if DROPOUT:
        keep = _dropout_keep_t(seed, bh, start_m, col0, dropout_p, BLOCK_M, BLOCK_N)
        pT_used = tl.where(keep, pT, dropout_p * 0.0)  # an opaque 0, as in _fwd_tile
    else:
        pT_used = pT
    dv = tl.dot(pT_used.to(do.dtype), do, dv, input_precision=PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    if DROPOUT:
        # P (Z dP - (1 - p) Delta) = (Z P) dP - P (1 - p) Delta: Z P is pT_used, so the keep mask need not
        # stay live (in predicate registers) across the dV product.
        dsT = pT_used * dpT - pT * delta[None, :]
    else:
        dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, Delta, KeyMask, SeqLens, CuSeqlens,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                   stride_lb, stride_lh, stride_mb,
                   num_heads, seq_len, max_seqlen, softmax_scale, dropout_p, Seed, seqlen_bucket,
                   HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr,
                   HAS_SEQLENS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key block, looping over the query blocks of its sequence. The loop never reads the key
    mask: padded queries have LSE = +inf (zero probabilities), and padded keys are zeroed once at the end."""
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0, "_dropout_keep needs blocks of 16")
    seed = _dropout_seed(Seed, DROPOUT)
    num_n_blocks = tl.cdiv(max_seqlen, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_n_blocks
    bh = pid // num_n_blocks
    b = bh // num_heads
    h = bh % num_heads
    start, seqlen, store_len, holes = _sequence(CuSeqlens, SeqLens, b, seq_len, VARLEN, HAS_SEQLENS)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    t64 = start.to(tl.int64)
    Q += b64 * stride_qb + h64 * stride_qh + t64 * stride_qm
    K += b64 * stride_kb + h64 * stride_kh + t64 * stride_kn
    V += b64 * stride_vb + h64 * stride_vh + t64 * stride_vn
    DO += b64 * stride_dob + h64 * stride_doh + t64 * stride_dom
    DK += b64 * stride_dkb + h64 * stride_dkh + t64 * stride_dkn
    DV += b64 * stride_dvb + h64 * stride_dvh + t64 * stride_dvn
    LSE += b64 * stride_lb + h64 * stride_lh + t64
    Delta += b64 * stride_lb + h64 * stride_lh + t64

    col0 = pid_n * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_seq = cols < seqlen
    k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :], mask=in_seq[:, None], other=0.0)
    v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=in_seq[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    qk_scale = softmax_scale * LOG2E
    keep_scale = 1.0 / (1.0 - dropout_p)
    hi = tl.where(col0 < seqlen, seqlen, 0)
    hi_full = (hi // BLOCK_M) * BLOCK_M
    for start_m in range(0, hi_full, BLOCK_M):
        dk, dv = _bwd_dkdv_tile(dk, dv, k, v, Q, DO, LSE, Delta, stride_qm, stride_dom, start_m, seqlen,
                                offs_m, cols, offs_d, qk_scale, dropout_p, seed, bh, col0,
                                False, DROPOUT, PRECISION, BLOCK_M, BLOCK_N)
    if hi_full < hi:
        dk, dv = _bwd_dkdv_tile(dk, dv, k, v, Q, DO, LSE, Delta, stride_qm, stride_dom, hi_full, seqlen,
                                offs_m, cols, offs_d, qk_scale, dropout_p, seed, bh, col0,
                                True, DROPOUT, PRECISION, BLOCK_M, BLOCK_N)

    # Column j of P feeds only dK_j and dV_j, so padded keys (and keys past the end, loaded as 0) are masked
    # once here instead of in every tile; whatever they accumulated (even inf/NaN) is discarded.
    key_ok = in_seq
    if HAS_MASK:
        key_ok = key_ok & (tl.load(KeyMask + b64 * stride_mb + cols, mask=in_seq, other=0) != 0)
    if DROPOUT:
        dk = tl.where(key_ok[:, None], dk * (softmax_scale * keep_scale), 0.0)
        dv = tl.where(key_ok[:, None], dv * keep_scale, 0.0)
    else:
        dk = tl.where(key_ok[:, None], dk * softmax_scale, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
    stored = (cols < store_len)[:, None]
    tl.store(DK + cols[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=stored)
    tl.store(DV + cols[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=stored)


@triton.jit
def _bwd_dq_tile(dq, q, do, lse2, delta, K, V, KeyMask, stride_kn, stride_vn, start_n, seqlen,
                 offs_m, offs_n, offs_d, qk_scale, dropout_p, seed, bh, row0,
                 BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = start_n + offs_n
    k_ptrs = K + cols[:, None] * stride_kn + offs_d[None, :]
    vT_ptrs = V + cols[None, :] * stride_vn + offs_d[:, None]
    if BOUNDS:
        k = tl.load(k_ptrs, mask=(cols < seqlen)[:, None], other=0.0)
        vT = tl.load(vT_ptrs, mask=(cols < seqlen)[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
        vT = tl.load(vT_ptrs)
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
    if BOUNDS:
        p = tl.where((cols < seqlen)[None, :], p, 0.0)
    if HAS_MASK:
        real_key = tl.load(KeyMask + cols, mask=cols < seqlen, other=0) != 0
        p = tl.where(real_key[None, :], p, 0.0)
    dp = tl.dot(do, vT, input_precision=PRECISION)
    if DROPOUT:  # the factor 1 / (1 - p) of kept entries is applied once, after the loop (_attn_bwd_dq)
        keep = _dropout_keep(seed, bh, row0, offs_m - row0, start_n, offs_n, dropout_p)
        dp = tl.where(keep, dp, 0.0)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.jit
def _bwd_dq_blocks(dq, q, do, lse2, delta, K, V, KeyMask, stride_kn, stride_vn, hi, seqlen,
                   offs_m, offs_n, offs_d, qk_scale, dropout_p, seed, bh, row0,
                   HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    hi_full = (hi // BLOCK_N) * BLOCK_N
    for start_n in range(0, hi_full, BLOCK_N):
        dq = _bwd_dq_tile(dq, q, do, lse2, delta, K, V, KeyMask, stride_kn, stride_vn, start_n, seqlen,
                          offs_m, offs_n, offs_d, qk_scale, dropout_p, seed, bh, row0,
                          False, HAS_MASK, DROPOUT, PRECISION, BLOCK_N)
    if hi_full < hi:
        dq = _bwd_dq_tile(dq, q, do, lse2, delta, K, V, KeyMask, stride_kn, stride_vn, hi_full, seqlen,
                          offs_m, offs_n, offs_d, qk_scale, dropout_p, seed, bh, row0,
                          True, HAS_MASK, DROPOUT, PRECISION, BLOCK_N)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, Delta, KeyMask, SeqLens, CuSeqlens,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                 stride_dqb, stride_dqh, stride_dqm, stride_lb, stride_lh, stride_mb,
                 num_heads, seq_len, max_seqlen, softmax_scale, dropout_p, Seed, seqlen_bucket,
                 HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEQLENS: tl.constexpr,
                 DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query block, looping over the key blocks of its sequence (no atomics: each program owns
    its rows)."""
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0, "_dropout_keep needs blocks of 16")
    seed = _dropout_seed(Seed, DROPOUT)
    num_m_blocks = tl.cdiv(max_seqlen, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = bh // num_heads
    h = bh % num_heads
    start, seqlen, store_len, holes = _sequence(CuSeqlens, SeqLens, b, seq_len, VARLEN, HAS_SEQLENS)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    t64 = start.to(tl.int64)
    Q += b64 * stride_qb + h64 * stride_qh + t64 * stride_qm
    K += b64 * stride_kb + h64 * stride_kh + t64 * stride_kn
    V += b64 * stride_vb + h64 * stride_vh + t64 * stride_vn
    DO += b64 * stride_dob + h64 * stride_doh + t64 * stride_dom
    DQ += b64 * stride_dqb + h64 * stride_dqh + t64 * stride_dqm
    LSE += b64 * stride_lb + h64 * stride_lh + t64
    Delta += b64 * stride_lb + h64 * stride_lh + t64
    if HAS_MASK:
        KeyMask += b64 * stride_mb

    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_seq = offs_m < seqlen
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=in_seq[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :], mask=in_seq[:, None], other=0.0)
    lse2 = tl.load(LSE + offs_m, mask=in_seq, other=float("inf")) * LOG2E
    delta = tl.load(Delta + offs_m, mask=in_seq, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = softmax_scale * LOG2E
    keep_scale = 1.0 / (1.0 - dropout_p)
    # With dropout, dS = P (dP - Delta) with dP = Z / (1 - p) dO . v is 1 / (1 - p) times
    # P (Z dO . v - (1 - p) Delta): the loop computes the latter (Delta comes in as (1 - p) Delta, from
    # _bwd_preprocess), and dQ takes the factor at the end.
    hi = tl.where(pid_m * BLOCK_M < seqlen, seqlen, 0)
    if HAS_MASK:
        if holes:  # as in the forward: only rows with holes read the mask key by key
            dq = _bwd_dq_blocks(dq, q, do, lse2, delta, K, V, KeyMask, stride_kn, stride_vn, hi, seqlen,
                                offs_m, offs_n, offs_d, qk_scale, dropout_p, seed, bh, row0,
                                True, DROPOUT, PRECISION, BLOCK_N)
        else:
            dq = _bwd_dq_blocks(dq, q, do, lse2, delta, K, V, KeyMask, stride_kn, stride_vn, hi, seqlen,
                                offs_m, offs_n, offs_d, qk_scale, dropout_p, seed, bh, row0,
                                False, DROPOUT, PRECISION, BLOCK_N)
    else:
        dq = _bwd_dq_blocks(dq, q, do, lse2, delta, K, V, KeyMask, stride_kn, stride_vn, hi, seqlen,
                            offs_m, offs_n, offs_d, qk_scale, dropout_p, seed, bh, row0,
                            False, DROPOUT, PRECISION, BLOCK_N)
    if DROPOUT:
        dq = dq * (softmax_scale * keep_scale)
    else:
        dq = dq * softmax_scale
    stored = (offs_m < store_len)[:, None]
    tl.store(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=stored)


# ---------------------------------------------------------------------------------------------------------
# Autograd glue
# ---------------------------------------------------------------------------------------------------------
def _strides(t, varlen):
    """(sequence, head, token) strides in elements; the head dim must be contiguous."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _empty_out(q, varlen):
    """An output laid out [B, L, H, D] in memory (viewed as [B, H, L, D]): the model's following
    transpose(1, 2).reshape(B, L, E) is then free."""
    if varlen:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    b, h, l, d = q.shape
    return torch.empty(b, l, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)


def _unit_last_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_meta(q, key_mask, seqlens, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed):
    """The keyword arguments every kernel of one attention call shares (forward and backward), with the
    grid's sequence count and the LSE strides. Derived from the inputs alone, so backward rebuilds them."""
    varlen = cu_seqlens is not None
    if varlen:
        n_seqs, (total, heads, head_dim) = cu_seqlens.numel() - 1, q.shape
        seq_len = 0
        lse_strides = (0, total)
    else:
        n_seqs, heads, seq_len, head_dim = q.shape
        max_seqlen = seq_len
        lse_strides = (heads * seq_len, seq_len)
    meta = dict(num_heads=heads, seq_len=seq_len, max_seqlen=max_seqlen,
                seqlen_bucket=next_power_of_2(max(max_seqlen, 1)),
                HEAD_DIM=head_dim, VARLEN=varlen, HAS_MASK=key_mask is not None,
                HAS_SEQLENS=seqlens is not None, DROPOUT=dropout_p > 0.0,
                # fp16/bf16 dots ignore it: one constant there, so it adds no compiled variant
                PRECISION=fp32_dot_precision() if q.dtype == torch.float32 else "tf32")
    return dict(meta, lse_strides=lse_strides, n_seqs=n_seqs, Seed=seed if dropout_p > 0.0 else None,
                dropout_p=dropout_p, softmax_scale=softmax_scale)


def _empty_lse(q, varlen):
    """fp32 log-sum-exp per (head, token): [H, total] varlen, [B, H, L] padded."""
    if varlen:
        return torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    return torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)


def _attention_forward(q, k, v, key_mask, seqlens, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed):
    """Launch the forward kernel: (o, lse). q, k, v: [B, H, L, D] (padded) or [T, H, D] (``cu_seqlens``), unit
    last stride; ``seed`` the dropout seed tensor (``_checks.new_dropout_seed``), None without dropout."""
    varlen = cu_seqlens is not None
    run = _launch_meta(q, key_mask, seqlens, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed)
    lse_strides, n_seqs = run.pop("lse_strides"), run.pop("n_seqs")
    heads, max_seqlen = run["num_heads"], run["max_seqlen"]
    lse = _empty_lse(q, varlen)
    o = _empty_out(q, varlen)
    if q.numel() == 0:  # nothing to launch (a compiled graph reaches the op with an empty batch)
        return o, lse

    def grid(cfg):
        return (cdiv(max_seqlen, cfg["BLOCK_M"]) * n_seqs * heads,)
    with on_device(q):
        _launch(_attn_fwd, grid, q, k, v, o, lse, key_mask, seqlens, cu_seqlens,
                *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(o, varlen),
                *lse_strides, key_mask.stride(0) if key_mask is not None else 0, **run)
    return o, lse


def _attention_backward(do, q, k, v, o, lse, key_mask, seqlens, cu_seqlens, max_seqlen, dropout_p,
                        softmax_scale, seed, dq, dk, dv):
    """Launch the three backward kernels, writing into dq, dk, dv (any strides with a unit last one)."""
    if q.numel() == 0:
        return
    run = _launch_meta(q, key_mask, seqlens, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed)
    lse_strides, n_seqs = run.pop("lse_strides"), run.pop("n_seqs")
    varlen, heads, max_seqlen = run["VARLEN"], run["num_heads"], run["max_seqlen"]
    do = _unit_last_stride(do)
    delta = torch.empty_like(lse)
    mask_stride = key_mask.stride(0) if key_mask is not None else 0

    def grid_n(cfg):
        return (cdiv(max_seqlen, cfg["BLOCK_N"]) * n_seqs * heads,)

    def grid_m(cfg):
        return (cdiv(max_seqlen, cfg["BLOCK_M"]) * n_seqs * heads,)
    pre_block = 64
    with on_device(q):
        _bwd_preprocess[(cdiv(max_seqlen, pre_block) * n_seqs * heads,)](
            o, do, delta, seqlens, cu_seqlens, *_strides(o, varlen), *_strides(do, varlen), *lse_strides,
            heads, run["seq_len"], max_seqlen, 1.0 - dropout_p,
            HEAD_DIM=run["HEAD_DIM"], VARLEN=varlen, HAS_SEQLENS=run["HAS_SEQLENS"], BLOCK_M=pre_block,
            **COMPILE_OPTIONS)
        _launch(_attn_bwd_dkdv, grid_n, q, k, v, do, dk, dv, lse, delta, key_mask, seqlens, cu_seqlens,
                *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
                *_strides(do, varlen), *_strides(dk, varlen), *_strides(dv, varlen),
                *lse_strides, mask_stride, **run)
        _launch(_attn_bwd_dq, grid_m, q, k, v, do, dq, lse, delta, key_mask, seqlens, cu_seqlens,
                *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
                *_strides(do, varlen), *_strides(dq, varlen), *lse_strides, mask_stride, **run)


# ---------------------------------------------------------------------------------------------------------
# Custom ops (see _library.py): separate q, k, v (padded or varlen), and the packed [B, L, 3, H, D] projection
# ---------------------------------------------------------------------------------------------------------
@custom_op("attention")
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
                  seqlens: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], max_seqlen: int,
                  dropout_p: float, softmax_scale: float, seed: Optional[torch.Tensor]
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    return _attention_forward(q, k, v, key_mask, seqlens, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed)


@_attention_op.register_fake
def _(q, k, v, key_mask, seqlens, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed):
    varlen = cu_seqlens is not None
    return _empty_out(q, varlen), _empty_lse(q, varlen)


@custom_op("attention_backward")
def _attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                           lse: torch.Tensor, key_mask: Optional[torch.Tensor], seqlens: Optional[torch.Tensor],
                           cu_seqlens: Optional[torch.Tensor], max_seqlen: int, dropout_p: float,
                           softmax_scale: float, seed: Optional[torch.Tensor]
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    varlen = cu_seqlens is not None
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    dq, dk, dv = _empty_out(q, varlen), _empty_out(k, varlen), _empty_out(v, varlen)
    _attention_backward(do, q, k, v, o, lse, key_mask, seqlens, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                        seed, dq, dk, dv)
    return dq, dk, dv


@_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, key_mask, seqlens, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed):
    varlen = cu_seqlens is not None
    return _empty_out(q, varlen), _empty_out(k, varlen), _empty_out(v, varlen)


def _attention_setup(ctx, inputs, output):
    q, k, v, key_mask, seqlens, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, key_mask, seqlens, cu_seqlens, seed)
    ctx.args = (max_seqlen, dropout_p, softmax_scale)
    ctx.set_materialize_grads(False)  # lse's gradient stays None, not a zeros tensor (a launch per call)


def _attention_grad(ctx, do, _dlse):
    if do is None:
        return (None,) * 10
    q, k, v, o, lse, key_mask, seqlens, cu_seqlens, seed = ctx.saved_tensors
    max_seqlen, dropout_p, softmax_scale = ctx.args
    dq, dk, dv = call(_attention_backward_op, do, q, k, v, o, lse, key_mask, seqlens, cu_seqlens, max_seqlen,
                      dropout_p, softmax_scale, seed)
    return dq, dk, dv, None, None, None, None, None, None, None


register_autograd(_attention_op, _attention_grad, _attention_setup)


# Attention on the fused [B, L, 3, H, D] projection: q, k, v are strided views of it, and backward writes dQ,
# dK, dV straight into one [B, L, 3, H, D] gradient, so autograd never stacks or copies the three (what
# unbinding the projection into q, k, v and running the attention op costs).
@custom_op("attention_packed")
def _attention_packed_op(qkv: torch.Tensor, key_mask: Optional[torch.Tensor], seqlens: Optional[torch.Tensor],
                         dropout_p: float, softmax_scale: float, seed: Optional[torch.Tensor]
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _packed_views(_unit_last_stride(qkv))
    return _attention_forward(q, k, v, key_mask, seqlens, None, 0, dropout_p, softmax_scale, seed)


@_attention_packed_op.register_fake
def _(qkv, key_mask, seqlens, dropout_p, softmax_scale, seed):
    q = _packed_views(qkv)[0]
    return _empty_out(q, False), _empty_lse(q, False)


@custom_op("attention_packed_backward")
def _attention_packed_backward_op(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                                  key_mask: Optional[torch.Tensor], seqlens: Optional[torch.Tensor],
                                  dropout_p: float, softmax_scale: float, seed: Optional[torch.Tensor]
                                  ) -> torch.Tensor:
    qkv = _unit_last_stride(qkv)
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    _attention_backward(do, *_packed_views(qkv), o, lse, key_mask, seqlens, None, 0, dropout_p, softmax_scale,
                        seed, *_packed_views(dqkv))
    return dqkv


@_attention_packed_backward_op.register_fake
def _(do, qkv, o, lse, key_mask, seqlens, dropout_p, softmax_scale, seed):
    return qkv.new_empty(qkv.shape)


def _attention_packed_setup(ctx, inputs, output):
    qkv, key_mask, seqlens, dropout_p, softmax_scale, seed = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse, key_mask, seqlens, seed)
    ctx.args = (dropout_p, softmax_scale)
    ctx.set_materialize_grads(False)


def _attention_packed_grad(ctx, do, _dlse):
    if do is None:
        return (None,) * 6
    qkv, o, lse, key_mask, seqlens, seed = ctx.saved_tensors
    dqkv = call(_attention_packed_backward_op, do, qkv, o, lse, key_mask, seqlens, *ctx.args, seed)
    return dqkv, None, None, None, None, None


register_autograd(_attention_packed_op, _attention_packed_grad, _attention_packed_setup)


# What the launch code runs on a GPU (see _library.COSTS). FLOPs are the tensor-core matmuls the kernels run,
# recomputation included: forward q k^T and p v (4 B H L^2 D); backward recomputes q k^T in each of its two
# main kernels, dk/dv's kernel adds p^T do, do v^T and ds^T q, dq's adds do v^T and ds k (14 B H L^2 D).
# Bytes are each tensor read or written once (K and V are re-read per query block from L2, not counted).
# A varlen batch counts as n_seqs sequences of max_seqlen tokens (an upper bound on the matmul work).
def _attention_shape(q, cu_seqlens, max_seqlen):
    """(sequences, heads, tokens per sequence, head dim) of the work an attention call does."""
    if cu_seqlens is not None:
        return cu_seqlens.numel() - 1, q.shape[1], max_seqlen, q.shape[2]
    return q.shape


def _attention_costs(qkv_bytes, o, lse, shape):
    b, h, l, d = shape
    qk = 2 * b * h * l * l * d
    return [KernelCost("attn_fwd", "attention", 2 * qk, qkv_bytes, nbytes(o) + nbytes(lse))]


def _attention_backward_costs(qkv_bytes, o, lse, mask_bytes, shape):
    b, h, l, d = shape
    qk = 2 * b * h * l * l * d
    do = nbytes(o)
    return [KernelCost("attn_bwd_preprocess", "attention", 0, 2 * do, nbytes(lse)),
            KernelCost("attn_bwd_dkdv", "attention", 4 * qk, qkv_bytes + do + 2 * nbytes(lse) + mask_bytes,
                       qkv_bytes * 2 // 3),
            KernelCost("attn_bwd_dq", "attention", 3 * qk, qkv_bytes + do + 2 * nbytes(lse) + mask_bytes,
                       qkv_bytes // 3)]


@register_cost("attention")
def _attention_cost(q, k, v, key_mask, seqlens, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed):
    o, lse = _empty_out(q, cu_seqlens is not None), _empty_lse(q, cu_seqlens is not None)
    return _attention_costs(nbytes(q) + nbytes(k) + nbytes(v) + nbytes(key_mask), o, lse,
                            _attention_shape(q, cu_seqlens, max_seqlen))


@register_cost("attention_backward")
def _attention_backward_cost(do, q, k, v, o, lse, key_mask, seqlens, cu_seqlens, max_seqlen, dropout_p,
                             softmax_scale, seed):
    return _attention_backward_costs(nbytes(q) + nbytes(k) + nbytes(v), o, lse, nbytes(key_mask),
                                     _attention_shape(q, cu_seqlens, max_seqlen))


@register_cost("attention_packed")
def _attention_packed_cost(qkv, key_mask, seqlens, dropout_p, softmax_scale, seed):
    q = _packed_views(qkv)[0]
    return _attention_costs(nbytes(qkv) + nbytes(key_mask), _empty_out(q, False), _empty_lse(q, False), q.shape)


@register_cost("attention_packed_backward")
def _attention_packed_backward_cost(do, qkv, o, lse, key_mask, seqlens, dropout_p, softmax_scale, seed):
    return _attention_backward_costs(nbytes(qkv), o, lse, nbytes(key_mask), _packed_views(qkv)[0].shape)


def _packed_views(qkv):
    """[B, L, 3, H, D] -> three [B, H, L, D] views (no copy)."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


# ---------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------
def _check_qkv(q, k, v, layout):
    ndim = layout.count(",") + 1
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=ndim)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=ndim, device=q.device)
        if t.dtype != q.dtype:
            raise TypeError(f"q, k and v must share a dtype; q is {q.dtype} but {name} is {t.dtype}")
        if t.shape != q.shape:
            raise ValueError(f"q, k and v must have the same shape {layout}; q is {tuple(q.shape)} but "
                             f"{name} is {tuple(t.shape)}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[-1]} is not supported; use one of {HEAD_DIMS}")


def _check_dropout(dropout_p):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def _softmax_scale(softmax_scale, head_dim):
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    return float(softmax_scale)


def _check_dropout_length(dropout_p, longest):
    if dropout_p > 0.0 and longest > DROPOUT_MAX_SEQLEN:
        raise ValueError(f"attention dropout supports sequences of at most {DROPOUT_MAX_SEQLEN} tokens, "
                         f"got {longest}")


class PreparedMask(NamedTuple):
    """A [B, L] key-padding mask turned, once per forward, into what the kernels read (``prepare_mask``): every
    layer of an encoder attends over the same keys, and working it out per layer costs the same half-dozen
    small launches each time. Pass it wherever ``attention_mask`` is accepted."""
    mask: torch.Tensor      # bool [B, L], True = real token: the checks and the eager path read it
    key_mask: torch.Tensor  # the same bytes as uint8, for the kernels
    seqlens: torch.Tensor   # int32 [B]: last real token + 1, negated for a row with holes (see _mask_and_lengths)


def prepare_mask(attention_mask):
    """``attention_mask`` ([B, L] bool or integer, 1 = real token) as a PreparedMask; None stays None."""
    if attention_mask is None or isinstance(attention_mask, PreparedMask):
        return attention_mask
    _check_mask_type(attention_mask)
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must have shape [B, L], got {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    key_mask, seqlens = _mask_and_lengths(real, real.shape[1], real.device)
    return PreparedMask(real, key_mask, seqlens)


def _check_mask_type(attention_mask):
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be bool or integer (1 = real token), got {attention_mask.dtype}")


def _kernel_mask(attention_mask, l, device):
    """(uint8 key mask, per-row lengths) for the kernels from a mask or a PreparedMask, or (None, None)."""
    if isinstance(attention_mask, PreparedMask):
        return attention_mask.key_mask, attention_mask.seqlens
    return _mask_and_lengths(attention_mask, l, device)


def _check_mask(attention_mask, b, l, device):
    if attention_mask is None:
        return
    if isinstance(attention_mask, PreparedMask):
        attention_mask = attention_mask.mask
    _check_mask_type(attention_mask)
    if attention_mask.shape != (b, l):
        raise ValueError(f"attention_mask must have shape [B, L] = {(b, l)}, got {tuple(attention_mask.shape)}")
    if attention_mask.device != device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but q is on {device}")


def _mask_and_lengths(attention_mask, l, device):
    """(uint8 key mask, per-row lengths) for the kernels, or (None, None) without a mask."""
    if attention_mask is None:
        return None, None
    real = attention_mask.bool()
    key_mask = real.contiguous().view(torch.uint8)
    # The last real token + 1 bounds each row's work (0 for a row without any); it is negated for a row with
    # holes (fewer real tokens than that), the only rows whose kernels read the mask key by key. Decided on
    # the device, per row: no host sync, and right-padded rows take the mask-free loop.
    positions = torch.arange(1, l + 1, dtype=torch.int32, device=device)
    last = (real * positions).amax(dim=1).to(torch.int32)
    seqlens = torch.where(real.sum(dim=1, dtype=torch.int32) == last, last, -last)
    return key_mask, seqlens


def attention(q, k, v, attention_mask=None, dropout_p=0.0, softmax_scale=None, dropout_seed=None):
    """softmax(scale * q k^T + mask) v with attention dropout; see the module docstring.

    q, k, v: [B, H, L, D] (any strides with a contiguous last dim; D in 16, 32, 64, 128), fp16/bf16 (fp32 for
    testing, its dots as ``fp32_dot_precision()`` says). attention_mask: [B, L] bool or integer, 1/True = real token
    (or its ``prepare_mask``, made once for many calls); None = all real. Returns
    [B, H, L, D] (laid out [B, L, H, D] in memory) with zeros at padded queries. ``dropout_p`` applies
    whenever it is > 0: pass 0.0 in eval mode. ``dropout_seed``: a one-element int64 tensor on the inputs'
    device (a slice of ``new_dropout_seeds``, drawn once for many calls) instead of a draw per call; the eager
    path draws its own mask either way.
    """
    _check_qkv(q, k, v, "[B, H, L, D]")
    b, _, l, d = q.shape
    dropout_p = _check_dropout(dropout_p)
    scale = _softmax_scale(softmax_scale, d)
    _check_mask(attention_mask, b, l, q.device)
    _check_dropout_length(dropout_p, l)
    if not triton_usable(q) or known_empty(q):
        return reference.attention(q, k, v, attention_mask, dropout_p=dropout_p, softmax_scale=scale)
    key_mask, seqlens = _kernel_mask(attention_mask, l, q.device)
    seed = dropout_seed_for(dropout_p, dropout_seed, q.device)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    return call(_attention_op, q, k, v, key_mask, seqlens, None, l, dropout_p, scale, seed)[0]


def attention_packed(qkv, attention_mask=None, dropout_p=0.0, softmax_scale=None, dropout_seed=None):
    """attention() on the fused projection: qkv [B, L, 3, H, D] (q, k, v along dim 2; any strides with a
    contiguous last dim), as ``x @ W_qkv.T`` viewed [B, L, 3, H, D] gives it. Returns [B, H, L, D] like
    attention(). Its gradient is one [B, L, 3, H, D] tensor that the backward kernels write dQ, dK and dV
    into directly: no stack or copy of the three, as unbinding qkv and calling attention() would cost.
    """
    check_tensor("qkv", qkv, dtypes=FLOAT_DTYPES, ndim=5)
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape [B, L, 3, H, D], got {tuple(qkv.shape)}")
    if qkv.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim {qkv.shape[-1]} is not supported; use one of {HEAD_DIMS}")
    b, l, _, _, d = qkv.shape
    dropout_p = _check_dropout(dropout_p)
    scale = _softmax_scale(softmax_scale, d)
    _check_mask(attention_mask, b, l, qkv.device)
    _check_dropout_length(dropout_p, l)
    if not triton_usable(qkv) or known_empty(qkv):
        return reference.attention_packed(qkv, attention_mask, dropout_p=dropout_p, softmax_scale=scale)
    key_mask, seqlens = _kernel_mask(attention_mask, l, qkv.device)
    seed = dropout_seed_for(dropout_p, dropout_seed, qkv.device)
    return call(_attention_packed_op, _unit_last_stride(qkv), key_mask, seqlens, dropout_p, scale, seed)[0]


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, validate=True,
                     dropout_seed=None):
    """attention() on each sequence of a packed batch: sequences never attend to each other.

    q, k, v: [total_tokens, H, D]. cu_seqlens: int32 [n_seqs + 1], 0 first, non-decreasing, total_tokens
    last. max_seqlen: an int >= the longest sequence. ``validate=True`` reads cu_seqlens on the host to check
    it (one device-to-host copy, a sync on CUDA); ``validate=False`` trusts cu_seqlens and max_seqlen (a
    caller that checked them once, as the model does per forward, not per layer) and never syncs. Under
    ``torch.compile`` that host read is skipped as with ``validate=False`` (it would break the graph); the
    type, dtype, shape and device checks always run.
    """
    _check_qkv(q, k, v, "[total_tokens, H, D]")
    dropout_p = _check_dropout(dropout_p)
    scale = _softmax_scale(softmax_scale, q.shape[-1])
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with n_seqs + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen must be an int, got {type(max_seqlen).__name__}")
    validate = validate and not compiling()  # reading cu_seqlens on the host would break the graph
    if validate:
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
        lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        if min(lengths) < 0:
            raise ValueError("cu_seqlens must be non-decreasing")
        if bounds[-1] != q.shape[0]:
            raise ValueError(f"cu_seqlens ends at {bounds[-1]} but q holds {q.shape[0]} tokens")
        if max(lengths) > max_seqlen:
            raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest sequence ({max(lengths)})")
    elif max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    # Unvalidated, max_seqlen stands in for the longest sequence: it is an upper bound of it.
    _check_dropout_length(dropout_p, max(lengths) if validate else max_seqlen)
    if not triton_usable(q) or known_empty(q):
        return reference.attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=dropout_p,
                                          softmax_scale=scale)
    seed = dropout_seed_for(dropout_p, dropout_seed, q.device)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    return call(_attention_op, q, k, v, None, None, cu_seqlens, max_seqlen, dropout_p, scale, seed)[0]
