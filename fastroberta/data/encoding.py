"""Encoding documents fast for pretokenization: ``DocumentEncoder`` on one core, ``encode_documents`` over
worker processes.

``DocumentEncoder`` gives the same ids as ``Tokenizer.encode`` (pinned by tests) 2-3 times faster on one core:
ASCII text is split by Python's ``re`` (exact on ASCII, where ``\\p{L}`` is ``[A-Za-z]`` and ``\\p{N}`` is
``[0-9]``), each distinct piece is merged once and then looked up; a word holding other characters is encoded by
the Rust tokenizer, also once per distinct word.
"""
import contextlib
import os
import re
from collections import deque
from itertools import chain, groupby

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers


# GPT-2's split, 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+, restricted to ASCII.
_ASCII_SPLIT = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+", re.ASCII)
# No piece of GPT-2's split holds a non-space followed by a space (spaces only lead a piece, or form one), and
# the split restarts at each piece boundary: so cutting text wherever a non-space meets an ASCII space leaves the
# pieces unchanged. Each cut-out part (a space run + a non-space run, roughly one word) is then encoded on its
# own: ASCII parts by the fast path, others by the Rust tokenizer, once per distinct part. Python's \S implies
# non-space for the Rust regex too (its Unicode White_Space is a subset of Python's whitespace).
_SAFE_CUT = re.compile(r"(?<=\S)(?=[ \t\n\r\x0b\x0c])")
_MAX_CACHED_PART = 64
_MAX_CACHED_WORDS = 1 << 20


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the other 68 bytes
    to the code points from 256 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TABLE = _bytes_to_unicode()


def _gpt2_pipeline(tokenizer):
    """Whether the tokenizer is exactly GPT-2/RoBERTa's pipeline, so the ASCII fast path reproduces it."""
    pre = tokenizer.pre_tokenizer
    if tokenizer.normalizer is not None or not isinstance(tokenizer.model, models.BPE):
        return False
    # BPE dropout draws a fresh split per call; caching one per word would freeze it.
    if tokenizer.model.dropout or not isinstance(pre, pre_tokenizers.ByteLevel):
        return False
    if pre.add_prefix_space or not pre.use_regex:
        return False
    # Non-special added tokens are cut out of the text before the split; the fast path would miss them.
    return all(t.special for t in tokenizer.get_added_tokens_decoder().values())


class DocumentEncoder:
    """Encodes documents to the ids ``tokenizer.encode(doc, add_special_tokens=False)`` gives, except that
    special-token strings inside the text ("<s>", "<mask>" ...) are encoded as plain text: a corpus cannot inject
    control tokens into the training stream."""

    def __init__(self, tokenizer):
        self._source = tokenizer
        self._model = tokenizer.model
        self._fast = _gpt2_pipeline(tokenizer)
        self._rust = None
        self._reset()

    def _encode_batch(self, texts):
        if self._rust is None:   # a private copy (made on first need: it costs a serialization round trip)
            self._rust = Tokenizer.from_str(self._source.to_str())
            self._rust.encode_special_tokens = True
            self._rust.no_padding()
            self._rust.no_truncation()
        encode = getattr(self._rust, "encode_batch_fast", self._rust.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def _reset(self):
        # Every distinct piece seen gets an index into a flat table of its ids (start, length), so a document
        # becomes a gather over the table instead of a Python loop over its tokens.
        self._index = {}
        self._table = np.zeros(1 << 16, np.uint32)
        self._start = np.zeros(1 << 12, np.int64)
        self._length = np.zeros(1 << 12, np.int64)
        self._num_ids = self._num_entries = 0

    def _add(self, id_lists):
        """Append entries to the table; returns the index of the first."""
        first, count = self._num_entries, len(id_lists)
        lengths = np.fromiter(map(len, id_lists), np.int64, count)
        ids = np.fromiter(chain.from_iterable(id_lists), np.uint32, int(lengths.sum()))
        while first + count > len(self._start):
            self._start = np.concatenate([self._start, np.zeros_like(self._start)])
            self._length = np.concatenate([self._length, np.zeros_like(self._length)])
        while self._num_ids + len(ids) > len(self._table):
            self._table = np.concatenate([self._table, np.zeros_like(self._table)])
        self._start[first:first + count] = self._num_ids + np.cumsum(lengths) - lengths
        self._length[first:first + count] = lengths
        self._table[self._num_ids:self._num_ids + len(ids)] = ids
        self._num_ids += len(ids)
        self._num_entries += count
        return first

    def encode(self, docs, dtype=np.int64):
        """(flat ids of all documents, per-document token counts) for the list of strings ``docs``."""
        if not self._fast:
            ids = self._encode_batch(docs)
            lengths = np.fromiter(map(len, ids), np.int64, len(ids))
            flat = np.fromiter(chain.from_iterable(ids), dtype, int(lengths.sum()))
            return flat, lengths
        if len(self._index) > _MAX_CACHED_WORDS or self._num_ids > 16 * _MAX_CACHED_WORDS:
            self._reset()
        findall = _ASCII_SPLIT.findall
        pieces, slow = [], []
        for doc in docs:
            if doc.isascii():
                pieces.append(findall(doc))
                continue
            words = []
            for ascii_run, parts in groupby(_SAFE_CUT.split(doc), str.isascii):
                if ascii_run:
                    words += findall("".join(parts))
                    continue
                for part in parts:
                    if len(part) <= _MAX_CACHED_PART:
                        words.append(part)
                    else:
                        # A long part (text without ASCII spaces) is seldom seen twice: an integer names it
                        # for this call only instead of growing the cache.
                        words.append(len(slow))
                        slow.append(part)
            pieces.append(words)
        all_words = list(chain.from_iterable(pieces))
        index = self._index
        new = set(all_words).difference(index)
        new.difference_update(range(len(slow)))
        if new:
            fast = [w for w in new if w.isascii()]
            rust = [w for w in new if not w.isascii()]
            if fast:
                tokenize, table = self._model.tokenize, _BYTE_TABLE
                first = self._add([[t.id for t in tokenize(word.translate(table))] for word in fast])
                index.update(zip(fast, range(first, first + len(fast))))
            if rust:
                first = self._add(self._encode_batch(rust))
                index.update(zip(rust, range(first, first + len(rust))))
        if slow:
            first = self._add(self._encode_batch(slow))
            index.update(zip(range(len(slow)), range(first, first + len(slow))))
        try:
            entries = np.fromiter(map(index.__getitem__, all_words), np.int64, len(all_words))
        finally:
            for key in range(len(slow)):
                del index[key]
        word_lengths = self._length[entries]
        ends = np.cumsum(word_lengths)
        # Position t of the output reads table[start of its word + t - first output position of its word].
        gather = np.repeat(self._start[entries] - (ends - word_lengths), word_lengths)
        gather += np.arange(len(gather))
        flat = self._table[gather].astype(dtype, copy=False)
        doc_ends = np.cumsum(np.fromiter(map(len, pieces), np.int64, len(pieces)))
        cum = np.concatenate([[0], ends])[doc_ends]
        lengths = np.diff(cum, prepend=0)
        return flat, lengths


_worker_encoder = None


def _init_worker(tokenizer_json, dtype):
    global _worker_encoder
    # One core per worker: the Rust tokenizer's own thread pool would oversubscribe the machine.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer
    _worker_encoder = (DocumentEncoder(Tokenizer.from_str(tokenizer_json)), np.dtype(dtype))


def _encode_in_worker(docs):
    encoder, dtype = _worker_encoder
    return encoder.encode(docs, dtype)


def _chunks(documents, chunk_chars):
    chunk, size = [], 0
    for doc in documents:
        chunk.append(doc)
        size += len(doc)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


@contextlib.contextmanager
def _env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def encode_documents(documents, tokenizer, dtype, num_workers, chunk_chars):
    """(flat ids, per-document lengths) for successive chunks of ``documents``, in order, encoded by
    ``num_workers`` processes (in this process when 1)."""
    if num_workers <= 1:
        encoder = DocumentEncoder(tokenizer)
        with _env("TOKENIZERS_PARALLELISM", "false"):
            for chunk in _chunks(documents, chunk_chars):
                yield encoder.encode(chunk, dtype)
        return
    import multiprocessing
    methods = multiprocessing.get_all_start_methods()
    # Never a plain fork: the caller usually runs threads (torch's, tokenizers' thread pool, gloo, the data
    # loader's prefetch thread), and a child forked while one of them held a lock can wait on it forever (seen:
    # the pool's shutdown hanging on such a worker). A forkserver forks from a clean single-threaded process.
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    # The variable also keeps tokenizers from starting a thread pool in every worker.
    with _env("TOKENIZERS_PARALLELISM", "false"), \
            context.Pool(num_workers, _init_worker, (tokenizer.to_str(), np.dtype(dtype).str)) as pool:
        pending = deque()
        for chunk in _chunks(documents, chunk_chars):
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            # A bounded queue keeps memory flat however large the corpus.
            while len(pending) > 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
