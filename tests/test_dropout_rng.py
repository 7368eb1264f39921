"""The dropout keep masks of the attention and LayerNorm kernels, drawn straight from their ``_dropout_keep``
helpers (and attention's transposed ``_dropout_keep_t``) through tiny test kernels under the interpreter:

- each is exactly the documented function of (seed, sequence * H + head, row, column): checked against an
  independent NumPy Philox4x32 (7 rounds for attention, 10 for LayerNorm; the round count is asserted) and
  its documented word/half mapping, in both tile orientations the
  attention kernels use (the forward and dQ kernels' [queries, keys], the dK/dV kernel's [keys, queries]);
- over more than 10^6 draws at p = 0.1 the keep rate is within 4 sigma of 1 - p, and keep decisions of
  neighbouring heads, sequences, rows and columns (including those that share one Philox call) are
  uncorrelated (|r| < 4 / sqrt(pairs)).
The kernels' own tests check that forward, backward and the padded/varlen forms replay the same mask.
"""
import importlib
import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

attn = importlib.import_module("fastroberta.kernels.attention")
ln = importlib.import_module("fastroberta.kernels.layer_norm")


@triton.jit
def _attention_keep_kernel(Out, seed, bh, p, L: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           KEYS_FIRST: tl.constexpr):
    row0 = tl.program_id(0) * BM
    col0 = tl.program_id(1) * BN
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    if KEYS_FIRST:  # the dK/dV kernel's [keys, queries] tiles
        keep = attn._dropout_keep_t(seed, bh + 0 * row0, row0, col0, p, BM, BN)
        tl.store(Out + (row0 + offs_m)[None, :] * L + (col0 + offs_n)[:, None], keep.to(tl.int8))
    else:
        keep = attn._dropout_keep(seed, bh + 0 * row0, row0, offs_m, col0, offs_n, p)
        tl.store(Out + (row0 + offs_m)[:, None] * L + (col0 + offs_n)[None, :], keep.to(tl.int8))


@triton.jit
def _layer_norm_keep_kernel(Out, seed, p, N: tl.constexpr):
    row = tl.program_id(0)
    tl.store(Out + row * N + tl.arange(0, N), ln._dropout_keep(seed, row, p, N).to(tl.int8))


def attention_keep(seed, bh, p, length, keys_first=False, bm=32, bn=64):
    """[length queries, length keys] bool keep mask of head stream ``bh``."""
    out = torch.empty(length, length, dtype=torch.int8)
    grid = (length // bm, length // bn)
    _attention_keep_kernel[grid](out, seed, bh, p, L=length, BM=bm, BN=bn, KEYS_FIRST=keys_first)
    return out.bool().numpy()


def layer_norm_keep(seed, p, rows, n):
    out = torch.empty(rows, n, dtype=torch.int8)
    _layer_norm_keep_kernel[(rows,)](out, seed, p, N=n)
    return out.bool().numpy()


def philox4x32(c0, c1, c2, c3, k0, k1, rounds=10):
    """Philox4x32 (Salmon et al. 2011), on uint64 NumPy arrays holding 32-bit values."""
    mask = np.uint64(0xFFFFFFFF)
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in (c0, c1, c2, c3))
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(rounds):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask)
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c0, c1, c2, c3


def threshold16(p):
    return min(int(p * 65536.0 + 0.5), 65535)


def attention_keep_documented(seed, bh, p, i, j):
    """The mapping attention.py documents, for arrays of query rows i and key columns j."""
    words = philox4x32(0, 4 * (j // 16) + (j // 2) % 4, 0, i - (i & 8), seed, bh, rounds=7)
    word = np.choose((2 * ((j // 8) % 2) + j % 2).astype(np.int64), words)
    half = np.where((i // 8) % 2 == 1, word >> np.uint64(16), word & np.uint64(0xFFFF))
    return half >= threshold16(p)


def layer_norm_keep_documented(seed, p, row, j):
    words = philox4x32(j // 8, row, 0, 0, seed, 0, rounds=10)
    word = np.choose(((j // 2) % 4).astype(np.int64), words)
    half = np.where(j % 2 == 1, word >> np.uint64(16), word & np.uint64(0xFFFF))
    return half >= threshold16(p)


def test_philox_reference_is_philox():
    # Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors): the NumPy reference
    # is the generator the papers define, so agreeing with it at 7 rounds pins the kernels' masks too.
    assert [int(w) for w in philox4x32(0, 0, 0, 0, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = 0xFFFFFFFF
    assert [int(w) for w in philox4x32(ones, ones, ones, ones, ones, ones)] == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


@pytest.mark.parametrize("keys_first", [False, True])
def test_attention_mask_is_the_documented_philox_function(keys_first):
    assert attn.DROPOUT_PHILOX_ROUNDS == 7  # the documented generator; change the reference with it
    seed, bh, p, length = 123457, 5, 0.3, 64
    keep = attention_keep(seed, bh, p, length, keys_first=keys_first, bm=16, bn=32)
    i, j = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    want = attention_keep_documented(seed, bh, p, i.astype(np.uint64), j.astype(np.uint64))
    assert np.array_equal(keep, want)


def test_attention_mask_does_not_depend_on_the_tiling():
    seed, bh, p = 99, 3, 0.1
    a = attention_keep(seed, bh, p, 128, bm=16, bn=32)
    assert np.array_equal(a, attention_keep(seed, bh, p, 128, bm=64, bn=128))
    assert np.array_equal(a, attention_keep(seed, bh, p, 128, keys_first=True, bm=32, bn=64))
    assert np.array_equal(a, attention_keep(seed, bh, p, 128, keys_first=True, bm=64, bn=128))
    assert np.array_equal(a, attention_keep(seed, bh, p, 128, keys_first=True, bm=16, bn=16))


def test_layer_norm_mask_is_the_documented_philox_function():
    seed, p, rows, n = 424242, 0.2, 3, 64
    keep = layer_norm_keep(seed, p, rows, n)
    r, j = np.meshgrid(np.arange(rows), np.arange(n), indexing="ij")
    assert np.array_equal(keep, layer_norm_keep_documented(seed, p, r.astype(np.uint64), j.astype(np.uint64)))


def _assert_uncorrelated(a, b, what):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    r = np.corrcoef(a, b)[0, 1]
    assert abs(r) < 4.0 / math.sqrt(a.size), f"{what}: correlation {r:.5f} over {a.size} pairs"


def _assert_rate(keep, p, what):
    n = keep.size
    sigma = math.sqrt(p * (1 - p) / n)
    rate = keep.mean()
    assert abs(rate - (1 - p)) < 4 * sigma, \
        f"{what}: keep rate {rate:.5f} over {n} draws, want {1 - p} +- {4 * sigma:.5f}"


def test_attention_keep_rate_and_independence():
    p, length, heads = 0.1, 512, 2
    # Streams sequence * H + head: 0 and 1 are neighbouring heads, 0 and 2 neighbouring sequences.
    masks = [attention_keep(2024, bh, p, length, bm=128, bn=128) for bh in range(4)]
    keep = np.stack(masks)
    assert keep.size >= 10**6
    _assert_rate(keep, p, "attention")
    _assert_uncorrelated(masks[0], masks[1], "neighbouring heads")
    _assert_uncorrelated(masks[0], masks[heads], "neighbouring sequences")
    # Lags 1 and 8 share a Philox call (other halves / words); 16 and 32 are neighbouring calls.
    for lag in (1, 8, 16):
        _assert_uncorrelated(keep[:, :-lag, :], keep[:, lag:, :], f"rows {lag} apart")
    for lag in (1, 2, 8, 16, 32):
        _assert_uncorrelated(keep[:, :, :-lag], keep[:, :, lag:], f"columns {lag} apart")


def test_layer_norm_keep_rate_and_independence():
    p, rows, n = 0.1, 64, 16384  # the widest row the kernels take: few programs for the interpreter
    keep = layer_norm_keep(77, p, rows, n)
    assert keep.size >= 10**6
    _assert_rate(keep, p, "layer norm")
    _assert_uncorrelated(keep[:-1], keep[1:], "neighbouring rows")
    for lag in (1, 2, 8):
        _assert_uncorrelated(keep[:, :-lag], keep[:, lag:], f"columns {lag} apart")
    other = layer_norm_keep(78, p, 8, n)
    _assert_uncorrelated(keep[:8], other, "neighbouring seeds")
