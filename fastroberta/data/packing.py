"""Packing a split's token stream into samples of ``seq_len`` positions (``seq_len`` counts every position,
<s> and </s> included; C = seq_len - 2):

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
"""
import contextlib
import os

import numpy as np

PACKING_MODES = ("full", "doc", "varlen")


def checked_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class Packer:
    """The samples of one split for one packing mode: ``num_samples`` and ``fill``, which writes chosen samples
    into a batch."""

    def __init__(self, prepared, split, seq_len, packing):
        if packing not in PACKING_MODES:
            raise ValueError(f"packing must be one of {PACKING_MODES}, got {packing!r}")
        self.seq_len = checked_int(seq_len, "seq_len", 3)
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
