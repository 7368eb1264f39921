"""RoBERTa's byte-level BPE tokenizer: train one on a corpus, load RoBERTa's files, save for Hugging Face, and
encode documents fast for pretokenization.

The special tokens are RoBERTa's: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3 and ``<mask>`` (4 in a trained
tokenizer, 50264 in roberta-base's). Text is pre-split by GPT-2's regular expression (contractions, letter runs,
digit runs, other-symbol runs, whitespace runs, each but the last with an optional leading space), every piece is
mapped to bytes shown as printable characters, and BPE merges the bytes.

``DocumentEncoder`` gives the same ids as ``Tokenizer.encode`` (pinned by tests) 2-3 times faster on one core:
ASCII text is split by Python's ``re`` (exact on ASCII, where ``\\p{L}`` is ``[A-Za-z]`` and ``\\p{N}`` is
``[0-9]``), each distinct piece is merged once and then looked up; a word holding other characters is encoded by
the Rust tokenizer, also once per distinct word.
"""
import json
import os
import re
from itertools import chain, groupby

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}
# A trained vocabulary holds the 256 byte symbols and the five special tokens before any merge.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def _special_token_list():
    # RoBERTa's <mask> swallows the space before it, so "a <mask>" fills the blank with a " word" token.
    return [AddedToken(t, special=True, lstrip=(k == "mask"), normalized=False) for k, t in SPECIAL_TOKENS.items()]


def _roberta_pipeline(tokenizer):
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # Positional: the keyword names of RobertaProcessing's arguments differ across tokenizers releases.
    tokenizer.post_processor = processors.RobertaProcessing(
        (SPECIAL_TOKENS["eos"], tokenizer.token_to_id(SPECIAL_TOKENS["eos"])),
        (SPECIAL_TOKENS["bos"], tokenizer.token_to_id(SPECIAL_TOKENS["bos"])), True, False)
    return tokenizer


def train_tokenizer(texts, vocab_size, show_progress=False):
    """A byte-level BPE of ``vocab_size`` entries (fewer if the corpus runs out of merges) trained on the
    iterable of strings ``texts``; ids 0-4 are <s>, <pad>, </s>, <unk>, <mask>."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} (256 byte symbols + "
                         f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=show_progress,
                                  special_tokens=_special_token_list(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return _roberta_pipeline(tokenizer)


def load_tokenizer(path):
    """A tokenizer from ``path``: a tokenizer.json file, a vocab.json (with merges.txt beside it), or a folder
    holding either (RoBERTa's vocab.json + merges.txt, or any tokenizer.json with RoBERTa's special tokens)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path not found: {path}")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            path = os.path.join(path, "tokenizer.json")
        elif os.path.isfile(os.path.join(path, "vocab.json")):
            path = os.path.join(path, "vocab.json")
        else:
            raise FileNotFoundError(f"no tokenizer.json and no vocab.json + merges.txt in the folder {path}")
    if os.path.basename(path) == "vocab.json":
        merges = os.path.join(os.path.dirname(path), "merges.txt")
        if not os.path.isfile(merges):
            raise FileNotFoundError(f"{path} needs merges.txt beside it; not found: {merges}")
        tokenizer = Tokenizer(models.BPE.from_file(path, merges))
        missing = [t for t in SPECIAL_TOKENS.values() if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"{path} lacks RoBERTa's special token(s) {missing}")
        # Registering them as special keeps their vocab ids and stops BPE from splitting "<mask>" in text.
        tokenizer.add_special_tokens(_special_token_list())
        tokenizer = _roberta_pipeline(tokenizer)
    else:
        try:
            tokenizer = Tokenizer.from_file(path)
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path} is not a readable tokenizer.json: {exc}") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    special_ids(tokenizer, source=path)
    return tokenizer


def special_ids(tokenizer, source="the tokenizer"):
    """{"bos", "pad", "eos", "unk", "mask"} -> id; ValueError naming any of RoBERTa's special tokens missing."""
    ids = {key: tokenizer.token_to_id(tok) for key, tok in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[k] for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"{source} lacks RoBERTa's special token(s) {missing}; the pipeline needs <s>, <pad>, "
                         "</s>, <unk> and <mask>")
    return ids


def save_tokenizer(tokenizer, out_dir, model_max_length=512):
    """Write tokenizer.json, and for a BPE model vocab.json + merges.txt, plus special_tokens_map.json and
    tokenizer_config.json, so that ``transformers.RobertaTokenizer(Fast).from_pretrained(out_dir)`` loads it."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    if isinstance(tokenizer.model, models.BPE):
        tokenizer.model.save(out_dir)
        # The model's vocab.json lacks special tokens that were only added on top of it (none in ours or
        # RoBERTa's); slow tokenizers read ids from vocab.json alone, so make sure every special id is there.
        vocab_path = os.path.join(out_dir, "vocab.json")
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        added = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS.values() if t not in vocab}
        if added:
            vocab.update(added)
            with open(vocab_path, "w", encoding="utf-8") as f:
                json.dump(vocab, f, ensure_ascii=False)
    mask = {"content": SPECIAL_TOKENS["mask"], "lstrip": True, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                   "pad_token": "<pad>", "cls_token": "<s>", "mask_token": mask}
    config = {"tokenizer_class": "RobertaTokenizer", "model_max_length": int(model_max_length),
              "add_prefix_space": False, "trim_offsets": True, "errors": "replace", **special_map}
    for name, content in (("special_tokens_map.json", special_map), ("tokenizer_config.json", config)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
            f.write("\n")


# --- fast document encoding -------------------------------------------------------------------------------

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
