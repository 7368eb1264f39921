"""A prepared dataset: ``prepare_dataset`` (corpus -> cached tokenizer and token shards) and the
``PreparedDataset`` it returns (memory-mapped tokens and document offsets of each split, the tokenizer)."""
import json
import os

import numpy as np

from fastroberta.data import tokenizer as tok
from fastroberta.data.cache import build_dataset, dataset_dir, default_cache_dir, get_tokenizer, is_complete
from fastroberta.data.documents import corpus_fingerprint, resolve_sources
from fastroberta.data.shards import SPLITS


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
