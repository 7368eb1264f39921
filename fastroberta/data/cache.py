"""The cache of prepared data: one folder per (corpus, tokenizer, split settings), and trained tokenizers, under
the cache directory; each built under a temporary name and renamed into place, a lock file keeping concurrent
processes (the ranks of one job) from building it twice."""
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil

import numpy as np

from fastroberta.data import shards
from fastroberta.data import tokenizer as tok
from fastroberta.data.documents import iter_documents
from fastroberta.data.shards import FORMAT_VERSION, SPLITS

logger = logging.getLogger("fastroberta.data")


def default_cache_dir():
    return os.environ.get("FASTROBERTA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastroberta")


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
                logger.info("training a %d-entry byte-level BPE on %s", vocab_size, shards.describe(sources))

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
        logger.info("pretokenizing %s into %s", shards.describe(sources), folder)

        def build(tmp):
            dtype, stats = shards.write_shards(tmp, sources, tokenizer, val_fraction, seed, num_workers, show_progress)
            tok.save_tokenizer(tokenizer, tmp)
            meta = {"format": FORMAT_VERSION, "dtype": np.dtype(dtype).name,
                    "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
                    "special_ids": tok.special_ids(tokenizer), "splits": stats, "corpus": shards.describe(sources),
                    "val_fraction": val_fraction, "seed": seed}
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=2)

        _build_atomically(folder, build)
