"""RoBERTa's dynamic masking, keyed so that a sample's mask is a pure function of (seed, epoch, sample index,
position): the same whatever the world size, micro-batch split or restart."""
import functools

import numpy as np

from fastroberta.config import IGNORE_INDEX
from fastroberta.data.shards import splitmix64

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def sample_keys(seed, epoch, samples):
    with np.errstate(over="ignore"):
        key = splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + _GOLDEN)
    key = splitmix64(key ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
    return splitmix64(key ^ np.asarray(samples, np.uint64))


def mask_tokens(input_ids, keys, maskable, random_ids, mask_id, mask_prob=0.15, replace_prob=0.8,
                random_prob=0.1):
    """RoBERTa's dynamic masking, in place on ``input_ids`` (int64 [B, L]); returns the labels.

    Each position with ``maskable[id]`` (not special, not padding) is chosen with probability ``mask_prob``;
    a chosen token becomes ``mask_id`` with probability ``replace_prob``, a uniform draw from ``random_ids``
    (the non-special ids) with ``random_prob``, and stays itself otherwise. Labels hold the original id at
    chosen positions and IGNORE_INDEX elsewhere. The randomness is SplitMix64 of keys[b] + (position + 1) * golden
    ratio (SplitMix64's own stream for seed keys[b]): row b's mask depends on its key and content only.
    """
    if input_ids.ndim != 2 or input_ids.dtype != np.int64 or not input_ids.flags.c_contiguous:
        raise ValueError("mask_tokens works in place on a C-contiguous int64 [batch, length] array, got "
                         f"{input_ids.dtype} {input_ids.shape}")
    batch, length = input_ids.shape
    h = np.asarray(keys, np.uint64)[:, None] + _positions(length)[None, :]
    splitmix64(h, inplace=True)
    # The top bits choose (h < p * 2^64 has probability p), the independent low 32 bits decide what happens.
    threshold = int(mask_prob * 2.0 ** 64)
    chosen = maskable[input_ids]
    if threshold < 2 ** 64:
        chosen &= h < np.uint64(threshold)
    where = np.flatnonzero(chosen)
    ids = input_ids.reshape(-1)
    labels = np.full(batch * length, IGNORE_INDEX, np.int64)
    labels[where] = ids[where]
    hashes = h.reshape(-1)[where]
    action = hashes & np.uint64(0xFFFFFFFF)
    to_mask = action < np.uint64(round(replace_prob * 2 ** 32))
    to_random = action < np.uint64(round((replace_prob + random_prob) * 2 ** 32))
    to_random &= ~to_mask
    ids[where[to_mask]] = mask_id
    if to_random.any():
        # A second hash picks the token: multiply-shift maps 32 uniform bits onto [0, n).
        r = hashes[to_random] ^ np.uint64(0xD1B54A32D192ED03)
        splitmix64(r, inplace=True)
        pick = ((r >> np.uint64(32)) * np.uint64(len(random_ids))) >> np.uint64(32)
        ids[where[to_random]] = random_ids[pick.astype(np.int64)]
    return labels.reshape(batch, length)


@functools.lru_cache(maxsize=16)
def _positions(length):
    pos = np.arange(1, length + 1, dtype=np.uint64)
    pos *= _GOLDEN
    pos.flags.writeable = False
    return pos
