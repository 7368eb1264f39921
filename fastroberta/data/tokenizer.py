"""RoBERTa's byte-level BPE tokenizer: train one on a corpus, load RoBERTa's files, and save for Hugging Face.

The special tokens are RoBERTa's: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3 and ``<mask>`` (4 in a trained
tokenizer, 50264 in roberta-base's). Text is pre-split by GPT-2's regular expression (contractions, letter runs,
digit runs, other-symbol runs, whitespace runs, each but the last with an optional leading space), every piece is
mapped to bytes shown as printable characters, and BPE merges the bytes. Encoding documents fast for
pretokenization: ``encoding.py``.
"""
import json
import os

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
