"""Pretokenize a corpus once into memory-mapped token shards, cached on disk.

On disk, one folder per (corpus, tokenizer, split settings) under the cache directory::

    meta.json                    format, dtype, vocab size, special ids, split sizes; written last
    tokenizer.json, vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json
    train.bin, val.bin           every document's ids followed by </s>, back to back (uint16, or uint32 when the
                                 vocabulary exceeds 65,535 entries)
    train.idx.npy, val.idx.npy   int64 document offsets [num_documents + 1] into the .bin (doc i is
                                 bin[idx[i] : idx[i+1] - 1], its </s> at idx[i+1] - 1)

The folder is built under a temporary name and renamed into place, so an interrupted run never leaves a cache
that is reused; a lock file keeps concurrent processes (the ranks of one job) from building it twice.
The validation split takes each document with probability ``val_fraction`` from a hash of (seed, document
index), at least one document when there are two or more, and never all of them. (What a document is:
``fastroberta.data.documents``.)
"""
import os

import numpy as np

from fastroberta.data import tokenizer as tok
from fastroberta.data.documents import corpus_bytes, iter_documents
from fastroberta.data.encoding import encode_documents

FORMAT_VERSION = 1
SPLITS = ("train", "val")


def splitmix64(x, inplace=False):
    """SplitMix64's finalizer: a bijective mix of uint64 arrays whose outputs look independent and uniform.
    ``inplace`` mixes the uint64 array ``x`` itself (no temporaries beyond numpy's own) and returns it."""
    if not inplace:
        x = np.array(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _is_val(seed, doc_index, val_fraction):
    key = splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ np.uint64(0x6A09E667F3BCC909))
    u = (splitmix64(key ^ doc_index.astype(np.uint64)) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return u < val_fraction


class _SplitWriter:
    def __init__(self, path, dtype, eos_id):
        self.path, self.dtype, self.eos_id = path, np.dtype(dtype), eos_id
        self.file = open(path, "wb")
        self.lengths = []   # per chunk: document lengths including their </s>

    def append(self, flat, lengths):
        if not len(lengths):
            return
        out = np.empty(len(flat) + len(lengths), self.dtype)
        sep = np.cumsum(lengths + 1) - 1
        is_token = np.ones(len(out), bool)
        is_token[sep] = False
        out[is_token] = flat
        out[sep] = self.eos_id
        out.tofile(self.file)
        self.lengths.append(lengths + 1)

    def num_documents(self):
        return sum(len(x) for x in self.lengths)

    def pop_last(self):
        """Remove the last document; returns its ids without the </s>."""
        self.file.flush()
        last = int(self.lengths[-1][-1])
        self.lengths[-1] = self.lengths[-1][:-1]
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            f.seek(size - last * self.dtype.itemsize)
            ids = np.frombuffer(f.read(), self.dtype)[:-1].copy()
        self.file.truncate(size - last * self.dtype.itemsize)
        self.file.seek(0, os.SEEK_END)
        return ids

    def close(self):
        self.file.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        np.save(self.path[:-len(".bin")] + ".idx.npy", offsets)
        return {"num_tokens": int(offsets[-1]), "num_documents": len(lengths)}


def _select(flat, lengths, keep):
    return flat[np.repeat(keep, lengths)], lengths[keep]


def write_shards(out_dir, sources, tokenizer, val_fraction, seed, num_workers, show_progress):
    """Encode the corpus into ``out_dir`` (train/val .bin + .idx.npy); returns the split statistics."""
    ids = tok.special_ids(tokenizer)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab_size <= 65535 else np.uint32
    total = corpus_bytes(sources)
    if num_workers is None:
        num_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        # Below ~1 MB the pool's start-up costs more than it saves.
        if total is not None and total < (1 << 20):
            num_workers = 1
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive integer or None, got {num_workers!r}")
    chunk_chars = 1 << 20 if total is None else int(np.clip(total // (8 * num_workers), 1 << 16, 1 << 22))

    from tqdm.auto import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="pretokenizing", disable=not show_progress)
    writers = {s: _SplitWriter(os.path.join(out_dir, f"{s}.bin"), dtype, ids["eos"]) for s in SPLITS}
    num_docs = 0
    try:
        documents = iter_documents(sources, progress=bar.update)
        for flat, lengths in encode_documents(documents, tokenizer, dtype, num_workers, chunk_chars):
            val = _is_val(seed, np.arange(num_docs, num_docs + len(lengths)), val_fraction)
            num_docs += len(lengths)
            if not val.any():
                writers["train"].append(flat, lengths)
            else:
                writers["train"].append(*_select(flat, lengths, ~val))
                writers["val"].append(*_select(flat, lengths, val))
        if num_docs == 0:
            raise ValueError(f"the corpus {describe(sources)} is empty: it holds no non-blank text")
        # Small corpora: keep at least one document on each side when there are two.
        if num_docs >= 2 and val_fraction > 0:
            for src, dst in (("train", "val"), ("val", "train")):
                if writers[dst].num_documents() == 0:
                    doc = writers[src].pop_last()
                    writers[dst].append(doc, np.array([len(doc)], np.int64))
    finally:
        bar.close()
        stats = {s: w.close() for s, w in writers.items()}
    return dtype, stats


def describe(sources):
    names = [where for _, where in sources]
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more)"
