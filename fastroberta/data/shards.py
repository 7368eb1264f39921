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
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections import deque

import numpy as np

from fastroberta.data import tokenizer as tok
from fastroberta.data.documents import corpus_bytes, corpus_fingerprint, iter_documents, resolve_sources

FORMAT_VERSION = 1
SPLITS = ("train", "val")
logger = logging.getLogger("fastroberta.data")


def default_cache_dir():
    return os.environ.get("FASTROBERTA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastroberta")


# --- encoding in parallel ---------------------------------------------------------------------------------

_worker_encoder = None


def _init_worker(tokenizer_json, dtype):
    global _worker_encoder
    # One core per worker: the Rust tokenizer's own thread pool would oversubscribe the machine.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer
    _worker_encoder = (tok.DocumentEncoder(Tokenizer.from_str(tokenizer_json)), np.dtype(dtype))


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
        encoder = tok.DocumentEncoder(tokenizer)
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


# --- writing shards ---------------------------------------------------------------------------------------

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
            raise ValueError(f"the corpus {_describe(sources)} is empty: it holds no non-blank text")
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


def _describe(sources):
    names = [where for _, where in sources]
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more)"


# --- the cache --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _lock(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # no flock (Windows): concurrent builds still end in one atomic rename
            pass
        yield


def _digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _build_atomically(final, build):
    """Run ``build(tmp_dir)`` and rename tmp_dir to ``final``; leftovers of interrupted builds are removed."""
    parent, name = os.path.split(final)
    for entry in os.listdir(parent):
        if entry.startswith(name + ".tmp-"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    tmp = f"{final}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        build(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _corpus_name(sources):
    kind, where = sources[0]
    base = where[len("hf:"):] if kind == "hf" else os.path.basename(where.rstrip(os.sep))
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base.split(".")[0] or "corpus")[:40]
    return base + ("-etc" if len(sources) > 1 else "")


def get_tokenizer(spec, sources, fingerprint, cache_dir, vocab_size, show_progress):
    """The tokenizer ``spec`` names (a path or a Tokenizer), or one trained on the corpus and cached."""
    from tokenizers import Tokenizer
    if isinstance(spec, Tokenizer):
        tokenizer = Tokenizer.from_str(spec.to_str())
        tok.special_ids(tokenizer)
        return tokenizer
    if spec is not None:
        return tok.load_tokenizer(spec)
    key = _digest({"format": FORMAT_VERSION, "corpus": fingerprint, "vocab_size": vocab_size})
    folder = os.path.join(cache_dir, "tokenizers", f"{_corpus_name(sources)}-bpe{vocab_size}-{key}")
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        with _lock(folder + ".lock"):
            if not os.path.isfile(path):
                logger.info("training a %d-entry byte-level BPE on %s", vocab_size, _describe(sources))

                def build(tmp):
                    docs = iter_documents(sources, warn=False)
                    trained = tok.train_tokenizer(docs, vocab_size, show_progress=show_progress)
                    trained.save(os.path.join(tmp, "tokenizer.json"))

                _build_atomically(folder, build)
    return Tokenizer.from_file(path)


def dataset_dir(cache_dir, sources, fingerprint, tokenizer, val_fraction, seed):
    key = _digest({"format": FORMAT_VERSION, "corpus": fingerprint, "val_fraction": val_fraction, "seed": seed,
                   "tokenizer": hashlib.sha256(tokenizer.to_str().encode()).hexdigest()})
    return os.path.join(cache_dir, f"{_corpus_name(sources)}-{key}")


def is_complete(folder):
    """A finished dataset folder: meta.json present and every shard the size it records."""
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        itemsize = np.dtype(meta["dtype"]).itemsize
        return meta.get("format") == FORMAT_VERSION and all(
            os.path.getsize(os.path.join(folder, f"{s}.bin")) == meta["splits"][s]["num_tokens"] * itemsize
            and os.path.isfile(os.path.join(folder, f"{s}.idx.npy")) for s in SPLITS)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build_dataset(folder, sources, tokenizer, val_fraction, seed, num_workers, show_progress):
    if is_complete(folder):
        return
    with _lock(folder + ".lock"):
        if is_complete(folder):
            return
        logger.info("pretokenizing %s into %s", _describe(sources), folder)

        def build(tmp):
            dtype, stats = write_shards(tmp, sources, tokenizer, val_fraction, seed, num_workers, show_progress)
            tok.save_tokenizer(tokenizer, tmp)
            meta = {"format": FORMAT_VERSION, "dtype": np.dtype(dtype).name,
                    "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
                    "special_ids": tok.special_ids(tokenizer), "splits": stats, "corpus": _describe(sources),
                    "val_fraction": val_fraction, "seed": seed}
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=2)

        _build_atomically(folder, build)


# --- the public entry points ------------------------------------------------------------------------------

class PreparedDataset:
    """A pretokenized corpus on disk: the tokenizer, the special ids, and per split the token stream (read
    through numpy.memmap) and the document offsets."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not is_complete(self.path):
            raise ValueError(f"{self.path} is not a complete prepared dataset (no meta.json or shards of the "
                             "recorded size); run prepare_dataset")
        with open(os.path.join(self.path, "meta.json")) as f:
            self.meta = json.load(f)
        from tokenizers import Tokenizer
        self.tokenizer = Tokenizer.from_file(os.path.join(self.path, "tokenizer.json"))
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_ids = tok.special_ids(self.tokenizer, source=self.path)
        self.dtype = np.dtype(self.meta["dtype"])
        self._tokens = {}

    def __repr__(self):
        sizes = ", ".join(f"{s}: {self.num_tokens(s):,} tokens / {self.num_documents(s):,} docs" for s in SPLITS)
        return f"PreparedDataset({self.path!r}, vocab_size={self.vocab_size}, {sizes})"

    def _check_split(self, split):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")

    def tokens(self, split):
        """The split's token stream (documents each followed by </s>) as a read-only array over the file."""
        self._check_split(split)
        if split not in self._tokens:
            if self.num_tokens(split) == 0:
                self._tokens[split] = np.zeros(0, self.dtype)
            else:
                # A plain ndarray view of the map slices far faster than np.memmap's subclass.
                mm = np.memmap(os.path.join(self.path, f"{split}.bin"), dtype=self.dtype, mode="r")
                self._tokens[split] = mm.view(np.ndarray)
        return self._tokens[split]

    def doc_offsets(self, split):
        """int64 [num_documents + 1]: document i is tokens[off[i] : off[i+1] - 1], its </s> at off[i+1] - 1."""
        self._check_split(split)
        return np.load(os.path.join(self.path, f"{split}.idx.npy"))

    def num_tokens(self, split):
        """Ids stored for the split: its documents' tokens plus one </s> per document."""
        self._check_split(split)
        return int(self.meta["splits"][split]["num_tokens"])

    def num_documents(self, split):
        self._check_split(split)
        return int(self.meta["splits"][split]["num_documents"])

    def save_tokenizer(self, out_dir, model_max_length=512):
        """tokenizer.json, vocab.json + merges.txt, special_tokens_map.json and tokenizer_config.json in
        ``out_dir``: loadable by transformers' RobertaTokenizer(Fast).from_pretrained and by load_tokenizer."""
        tok.save_tokenizer(self.tokenizer, out_dir, model_max_length=model_max_length)

    def check_vocab(self, model, allow_larger=False):
        """ValueError unless the tokenizer fits the model: ``model`` is a vocabulary size or a config with
        ``vocab_size`` (and then its pad/bos/eos ids are checked too). The sizes must be equal, or with
        ``allow_larger`` the model's may exceed the tokenizer's (a vocabulary padded for speed)."""
        model_vocab = model if isinstance(model, (int, np.integer)) else getattr(model, "vocab_size", None)
        if isinstance(model_vocab, bool) or not isinstance(model_vocab, (int, np.integer)):
            raise TypeError(f"check_vocab takes a vocabulary size or a config with vocab_size, got {model!r}")
        if model_vocab < self.vocab_size or (model_vocab != self.vocab_size and not allow_larger):
            raise ValueError(f"the tokenizer has {self.vocab_size} entries but the model's vocab_size is "
                             f"{model_vocab}; build the model with vocab_size={self.vocab_size} (tokenizer in "
                             f"{self.path})")
        for key, field in (("pad", "pad_token_id"), ("bos", "bos_token_id"), ("eos", "eos_token_id")):
            value = getattr(model, field, None)
            if value is not None and value != self.special_ids[key]:
                raise ValueError(f"the model's {field} is {value} but the tokenizer's {SPECIAL_NAME[key]} is "
                                 f"{self.special_ids[key]}")


SPECIAL_NAME = tok.SPECIAL_TOKENS


def prepare_dataset(data=None, tokenizer=None, cache_dir=None, vocab_size=8192, val_fraction=0.05, seed=0,
                    num_workers=None, show_progress=True):
    """Tokenize a corpus once into cached shards and return the PreparedDataset.

    data: None (the bundled Tiny Shakespeare), a text file, a .jsonl file (a "text" field per line), a folder of
        such files, "hf:<name>[:config][:split]" (needs the datasets package), or a list of these.
    tokenizer: None trains a byte-level BPE of ``vocab_size`` on the corpus (cached under cache_dir/tokenizers);
        otherwise a tokenizer.json / vocab.json path or folder (RoBERTa's files), or a tokenizers.Tokenizer.
    cache_dir: where tokenizers and shards live (default $FASTROBERTA_CACHE or ~/.cache/fastroberta); the
        shards are keyed by the corpus files' paths, sizes and mtimes, the tokenizer's content, val_fraction
        and seed, so a second call with the same inputs reuses them.
    val_fraction: share of documents held out for validation, in [0, 1).
    num_workers: processes that encode in parallel (None: one per core, or one for a corpus under 1 MB).
    """
    if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    sources = resolve_sources(data)
    cache_dir = os.path.abspath(os.fspath(cache_dir if cache_dir is not None else default_cache_dir()))
    os.makedirs(cache_dir, exist_ok=True)
    fingerprint = corpus_fingerprint(sources)
    tokenizer = get_tokenizer(tokenizer, sources, fingerprint, cache_dir, vocab_size, show_progress)
    folder = dataset_dir(cache_dir, sources, fingerprint, tokenizer, float(val_fraction), int(seed))
    build_dataset(folder, sources, tokenizer, float(val_fraction), int(seed), num_workers, show_progress)
    return PreparedDataset(folder)
