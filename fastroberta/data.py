"""RoBERTa's pretraining data: packing the token stream into samples, dynamic masking, and a resumable loader
sharded by data-parallel rank. The steps before live in ``fastroberta.documents`` (corpus -> documents),
``fastroberta.tokenizer`` (byte-level BPE) and ``fastroberta.shards`` (documents -> cached token shards); their
entry points are re-exported here, so ``fastroberta.data`` is the whole pipeline's API.

Packing (``seq_len`` counts every position, <s> and </s> included; C = seq_len - 2):

- ``"full"`` FULL-SENTENCES, RoBERTa's default: the split's stream (documents each followed by </s>) cut into
  consecutive blocks of C tokens; a sample is <s> + block + </s>, where a block's leading </s> (the end of the
  document the previous block finished) is dropped and a block that already ends in </s> gets no second one.
  Samples cross documents and fill seq_len up to two positions (a dropped </s>, no second </s>); only the last
  sample of the split can be shorter.
- ``"doc"`` DOC-SENTENCES: each document cut into blocks of C tokens, <s> + block + </s>; no sample crosses a
  document, so a short document makes a short (padded) sample.
- ``"varlen"``: documents packed greedily, each piece as its own <s> piece </s> segment, a document split
  wherever a sample fills up; a sample is padded only when fewer than 3 positions (too few for a segment) are
  left. ``cu_seqlens`` gives the segments, so attention_varlen keeps documents apart.

Order and masks are pure functions of (seed, epoch, sample index): the epoch's sample order is a permutation
drawn from (seed, epoch); optimizer step s takes samples order[s*G : (s+1)*G] (G = global batch), and micro-batch
k of rank r the slice [(k*W + r)*m, (k*W + r + 1)*m) of those (m = micro batch, W = world size). The masks hash
(seed, epoch, sample index, position), so a sample gets the same mask whatever the world size, micro-batch
split or restart. With ``drop_last`` (default) the last incomplete global batch of an epoch is dropped (a
different remainder each epoch, as the order is reshuffled); an epoch with fewer samples than one global batch,
or ``drop_last=False``, completes its last step by wrapping around to the start of the epoch's order.
"""
import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fastroberta.config import IGNORE_INDEX
from fastroberta.documents import default_corpus_path
from fastroberta.shards import PreparedDataset, prepare_dataset
from fastroberta.shards import splitmix64
from fastroberta.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

PACKING_MODES = ("full", "doc", "varlen")

__all__ = ["default_corpus_path", "prepare_dataset", "PreparedDataset", "MLMDataLoader", "IGNORE_INDEX",
           "check_batch", "PACKING_MODES", "Packer", "mask_tokens", "load_tokenizer", "save_tokenizer",
           "train_tokenizer"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# --- packing ----------------------------------------------------------------------------------------------

class Packer:
    """The samples of one split for one packing mode: ``num_samples`` and ``fill``, which writes chosen samples
    into a batch."""

    def __init__(self, prepared, split, seq_len, packing):
        if packing not in PACKING_MODES:
            raise ValueError(f"packing must be one of {PACKING_MODES}, got {packing!r}")
        self.seq_len = _int(seq_len, "seq_len", 3)
        self.packing = packing
        self.tokens = prepared.tokens(split)
        offsets = prepared.doc_offsets(split)
        ids = prepared.special_ids
        self.bos, self.eos = ids["bos"], ids["eos"]
        content = self.seq_len - 2
        if packing == "full":
            n = len(self.tokens)
            count = -(-n // content)
            # A last block holding only the final </s> would be an empty sample.
            self.num_samples = count - 1 if n % content == 1 else count
        elif packing == "doc":
            lengths = np.diff(offsets) - 1
            pieces = -(-lengths // content)
            doc = np.repeat(np.arange(len(lengths)), pieces)
            first = np.cumsum(pieces) - pieces
            chunk = np.arange(len(doc)) - first[doc]
            self.starts = offsets[:-1][doc] + chunk * content
            self.lengths = np.minimum(content, lengths[doc] - chunk * content)
            self.num_samples = len(doc)
        else:
            self.seg_ptr, self.seg_start, self.seg_len = _cached_varlen_packing(prepared, split, offsets,
                                                                                self.seq_len)
            self.num_samples = len(self.seg_ptr) - 1

    def fill(self, samples, out):
        """Write ``samples`` (indices) into ``out`` (int64 [len(samples), seq_len], already pad-filled); returns
        (lengths int64 [batch], segment lengths of every sample in order, or None unless varlen)."""
        if self.packing == "varlen":
            return self._fill_segments(samples, out)
        tokens, bos, eos, content = self.tokens, self.bos, self.eos, self.seq_len - 2
        lengths = np.empty(len(samples), np.int64)
        for j, k in enumerate(samples):
            if self.packing == "full":
                block = tokens[k * content:(k + 1) * content]
                if block[0] == eos:
                    block = block[1:]
            else:
                a = self.starts[k]
                block = tokens[a:a + self.lengths[k]]
            n = len(block)
            row = out[j]
            row[0] = bos
            row[1:n + 1] = block
            if n == 0 or block[-1] != eos:
                n += 1
                row[n] = eos
            lengths[j] = n + 1
        return lengths, None

    def _fill_segments(self, samples, out):
        samples = np.asarray(samples, np.int64)
        # Vectorized over every segment of the batch: a few numpy passes instead of a Python loop per segment.
        ptr = self.seg_ptr
        counts = ptr[samples + 1] - ptr[samples]
        seg = np.repeat(ptr[samples] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        sizes = self.seg_len[seg] + 2                        # <s> piece </s>
        ends = np.cumsum(sizes)
        begins = ends - sizes
        # Output position t of a segment reads stream[start - 1 + t]; its first and last become <s> and </s>.
        source = np.repeat(self.seg_start[seg] - 1 - begins, sizes) + np.arange(ends[-1] if len(ends) else 0)
        flat = self.tokens[np.clip(source, 0, max(len(self.tokens) - 1, 0))].astype(np.int64)
        flat[begins] = self.bos
        flat[ends - 1] = self.eos
        lengths = np.add.reduceat(sizes, np.cumsum(counts) - counts) if len(sizes) else np.zeros(0, np.int64)
        row_begin = np.cumsum(lengths) - lengths
        rows = np.repeat(np.arange(len(samples)), lengths)
        cols = np.arange(len(flat)) - np.repeat(row_begin, lengths)
        out[rows, cols] = flat
        return lengths.astype(np.int64), sizes.astype(np.int64)


def _cached_varlen_packing(prepared, split, offsets, seq_len):
    """_pack_varlen's result, kept beside the shards: the greedy pass is a Python loop (~1.5 s per 300M tokens)
    that every rank would otherwise repeat at every start."""
    path = os.path.join(prepared.path, f"{split}.varlen-{seq_len}.npz")
    try:
        with np.load(path) as saved:
            return saved["ptr"], saved["start"], saved["length"]
    except (OSError, KeyError, ValueError):
        pass
    packed = _pack_varlen(offsets, seq_len)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    try:
        np.savez(tmp, ptr=packed[0], start=packed[1], length=packed[2])
        os.replace(tmp, path)
    except OSError:   # a read-only cache still works, it just packs again next time
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return packed


def _pack_varlen(offsets, seq_len):
    """Greedy packing of documents into samples of at most seq_len positions, every piece of a document a
    <s> piece </s> segment. Returns (segment pointer per sample [num_samples + 1], segment start in the stream,
    segment token count)."""
    starts, lens, first = [], [], []
    room = 0
    for i in range(len(offsets) - 1):
        pos, left = int(offsets[i]), int(offsets[i + 1]) - 1 - int(offsets[i])
        while left > 0:
            if room < 3:
                first.append(len(starts))
                room = seq_len
            take = min(left, room - 2)
            starts.append(pos)
            lens.append(take)
            pos += take
            left -= take
            room -= take + 2
    first.append(len(starts))
    return np.asarray(first, np.int64), np.asarray(starts, np.int64), np.asarray(lens, np.int64)


# --- masking ----------------------------------------------------------------------------------------------

def _sample_keys(seed, epoch, samples):
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




def check_batch(batch, vocab_size):
    """Raise ValueError when a batch holds a token id or label outside the vocabulary, or cu_seqlens that do
    not count its real tokens: checked here on the host, so the model need not read them on the device."""
    ids, labels, mask = batch["input_ids"].numpy(), batch["labels"].numpy(), batch["attention_mask"].numpy()
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"a batch holds token ids outside the vocabulary [0, {vocab_size}): "
                         f"[{ids.min()}, {ids.max()}]; the shards do not match the tokenizer")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size) | (mask == 0))
    if bad.any():
        raise ValueError(f"a batch holds a label outside the vocabulary [0, {vocab_size}) or on padding")
    if "cu_seqlens" in batch:
        cu = batch["cu_seqlens"].numpy()
        if cu.size < 2 or cu[0] != 0 or (np.diff(cu) < 0).any() or cu[-1] != mask.sum():
            raise ValueError("a batch's cu_seqlens do not count its real tokens (0 first, non-decreasing, "
                             "ending at the number of real tokens)")


# --- the loader -------------------------------------------------------------------------------------------

class MLMDataLoader:
    """Masked-LM micro-batches of one split for one data-parallel rank, in order; see the module docstring for
    the packing modes, the sample order and the masks.

    Yields dicts of CPU tensors: input_ids, attention_mask (1 = real token), labels (IGNORE_INDEX where not
    masked), all int64 [micro_batch_size, seq_len] padded with the pad id; for packing="varlen" also cu_seqlens
    (int32 [segments + 1], cumulative segment lengths over the batch's real tokens flattened in row order).
    Every batch is checked on the host (``check_batch``) so that the model can skip its own device-side checks
    (``validate=False``). While the consumer works on one batch, a background thread prepares the next (and pins
    it when ``pin_memory``, default: CUDA is available), so a non_blocking copy to the GPU is truly
    asynchronous; the position a checkpoint records still counts only the batches handed out.

    infinite=True cycles epochs forever. infinite=False makes one pass over the current epoch; the next pass
    repeats it (same order, same masks: evaluations stay comparable) until ``set_epoch`` moves on.
    state_dict()/load_state_dict() resume at exactly the next micro-batch; a state saved at an optimizer-step
    boundary also loads into a loader with another world size or micro-batch size but the same global batch.
    """

    def __init__(self, prepared, split="train", seq_len=128, micro_batch_size=8, global_batch_size=None, rank=0,
                 world_size=1, seed=0, packing="full", mask_prob=0.15, infinite=True, drop_last=True,
                 replace_prob=0.8, random_prob=0.1, pin_memory=None):
        if not isinstance(prepared, PreparedDataset):
            raise TypeError(f"prepared must be a PreparedDataset (from prepare_dataset), got {type(prepared)}")
        self.prepared, self.split = prepared, split
        self.seq_len = _int(seq_len, "seq_len", 3)
        self.micro_batch_size = _int(micro_batch_size, "micro_batch_size", 1)
        self.world_size = _int(world_size, "world_size", 1)
        self.rank = _int(rank, "rank", 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        per_step = self.micro_batch_size * self.world_size
        if global_batch_size is None:
            global_batch_size = per_step
        self.global_batch_size = _int(global_batch_size, "global_batch_size", 1)
        if self.global_batch_size % per_step:
            raise ValueError(f"global_batch_size {global_batch_size} must be divisible by micro_batch_size * "
                             f"world_size = {per_step}")
        self.grad_accum_steps = self.global_batch_size // per_step
        self.seed = int(seed)
        for name, p in (("mask_prob", mask_prob), ("replace_prob", replace_prob), ("random_prob", random_prob)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {p!r}")
        if replace_prob + random_prob > 1:
            raise ValueError(f"replace_prob + random_prob must not exceed 1, got {replace_prob + random_prob}")
        self.mask_prob, self.replace_prob, self.random_prob = float(mask_prob), float(replace_prob), float(random_prob)
        self.packing, self.infinite, self.drop_last = packing, bool(infinite), bool(drop_last)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)

        if prepared.num_documents(split) == 0:
            raise ValueError(f"the {split!r} split of {prepared.path} is empty"
                             + (" (the corpus has a single document, or val_fraction=0)" if split == "val" else ""))
        content = prepared.num_tokens(split) - prepared.num_documents(split)
        if split == "train" and content < self.seq_len - 2:
            raise ValueError(f"the train split holds {content} tokens, fewer than one sample of seq_len={seq_len} "
                             f"({seq_len - 2} tokens between <s> and </s>); use a larger corpus or a smaller seq_len")
        self.packer = Packer(prepared, split, self.seq_len, packing)
        self.num_samples = self.packer.num_samples
        ids = prepared.special_ids
        self.pad_id, self.mask_id = ids["pad"], ids["mask"]
        self.maskable = np.ones(prepared.vocab_size, bool)
        self.maskable[sorted(set(ids.values()))] = False
        self.random_ids = np.flatnonzero(self.maskable)
        if self.num_samples < self.global_batch_size or not self.drop_last:
            self.steps_per_epoch = -(-self.num_samples // self.global_batch_size)
        else:
            self.steps_per_epoch = self.num_samples // self.global_batch_size
        self.micro_batches_per_epoch = self.steps_per_epoch * self.grad_accum_steps
        self.epoch = 0
        self._position = 0      # micro-batches of the current epoch already yielded
        self._order_cache = (None, None)

    def __len__(self):
        """Micro-batches per epoch (per pass for infinite=False)."""
        return self.micro_batches_per_epoch

    def set_epoch(self, epoch):
        self.epoch = _int(epoch, "epoch", 0)
        self._position = 0

    def order(self, epoch):
        """The sample order of ``epoch``: a permutation drawn from (seed, epoch)."""
        if self._order_cache[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed & (2**63 - 1), epoch,
                                                                               0x0DE7])))
            self._order_cache = (epoch, rng.permutation(self.num_samples))
        return self._order_cache[1]

    def samples_of(self, epoch, position):
        """Sample indices of this rank's micro-batch ``position`` (step * grad_accum + k) of ``epoch``."""
        step, k = divmod(position, self.grad_accum_steps)
        m = self.micro_batch_size
        first = step * self.global_batch_size + (k * self.world_size + self.rank) * m
        return self.order(epoch)[np.arange(first, first + m) % self.num_samples]

    def collate(self, epoch, samples):
        """The batch of ``samples`` masked as in ``epoch``."""
        ids = np.full((len(samples), self.seq_len), self.pad_id, np.int64)
        lengths, segments = self.packer.fill(samples, ids)
        labels = mask_tokens(ids, _sample_keys(self.seed, epoch, samples), self.maskable, self.random_ids,
                             self.mask_id, self.mask_prob, self.replace_prob, self.random_prob)
        attention = (np.arange(self.seq_len)[None, :] < lengths[:, None]).astype(np.int64)
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attention),
                 "labels": torch.from_numpy(labels)}
        if segments is not None:
            cu = np.zeros(len(segments) + 1, np.int32)
            np.cumsum(segments, out=cu[1:])
            batch["cu_seqlens"] = torch.from_numpy(cu)
        check_batch(batch, self.prepared.vocab_size)
        return batch

    def _prepared_batch(self, epoch, samples):
        batch = self.collate(epoch, samples)
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch

    def _after(self, epoch, position):
        """(epoch, position) of the micro-batch that follows, or None at the end of a finite pass."""
        if position + 1 < self.micro_batches_per_epoch:
            return epoch, position + 1
        return (epoch + 1, 0) if self.infinite else None

    def __iter__(self):
        ahead = None  # ((epoch, position), future) of the batch prepared while the last one was in use
        with ThreadPoolExecutor(1, thread_name_prefix="mlm-batches") as pool:
            try:
                while True:
                    if self._position >= self.micro_batches_per_epoch:
                        self._position = 0
                        if not self.infinite:
                            return
                        self.epoch += 1
                    epoch, position = self.epoch, self._position
                    if ahead is not None and ahead[0] == (epoch, position):
                        batch = ahead[1].result()
                    else:  # the first batch, or the position moved (set_epoch, load_state_dict)
                        batch = self._prepared_batch(epoch, self.samples_of(epoch, position))
                    self._position = position + 1
                    following = self._after(epoch, position)
                    ahead = None
                    if following is not None:
                        # Sample indices here, on the consumer's thread (the order cache is not shared).
                        ahead = (following, pool.submit(self._prepared_batch, following[0],
                                                        self.samples_of(*following)))
                    yield batch
            finally:
                if ahead is not None:
                    ahead[1].cancel()

    # --- resume ---

    def _identity(self):
        return {"split": self.split, "seed": self.seed, "packing": self.packing, "seq_len": self.seq_len,
                "num_samples": self.num_samples, "global_batch_size": self.global_batch_size,
                "mask_prob": self.mask_prob, "replace_prob": self.replace_prob, "random_prob": self.random_prob,
                "drop_last": self.drop_last}

    def state_dict(self):
        step, micro = divmod(self._position, self.grad_accum_steps)
        return {"epoch": self.epoch, "step": step, "micro": micro, "world_size": self.world_size,
                "micro_batch_size": self.micro_batch_size, **self._identity()}

    def load_state_dict(self, state):
        for key, value in self._identity().items():
            if key in state and state[key] != value:
                raise ValueError(f"cannot resume: the saved loader has {key}={state[key]!r}, this one {value!r}")
        same_split = (state.get("world_size") == self.world_size
                      and state.get("micro_batch_size") == self.micro_batch_size)
        if state["micro"] and not same_split:
            raise ValueError("cannot resume mid-step (after micro-batch "
                             f"{state['micro']} of the step) with another world_size or micro_batch_size")
        if not 0 <= state["step"] <= self.steps_per_epoch:
            raise ValueError(f"saved step {state['step']} is outside the epoch's {self.steps_per_epoch} steps")
        self.epoch = int(state["epoch"])
        self._position = int(state["step"]) * self.grad_accum_steps + int(state["micro"])
