"""The byte-level BPE tokenizer: training, loading RoBERTa's file formats, Hugging Face export, and the fast
document encoder's equality with the Rust tokenizer."""
import json
import os
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from fastroberta.data.documents import iter_documents, resolve_sources
from fastroberta.data.encoding import DocumentEncoder
from fastroberta.data.tokenizer import MIN_VOCAB_SIZE, load_tokenizer, save_tokenizer, special_ids, train_tokenizer

SHAKESPEARE_DOCS = list(iter_documents(resolve_sources(None)))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(SHAKESPEARE_DOCS[:600], vocab_size=700)


def rust_ids(tokenizer, texts):
    ref = Tokenizer.from_str(tokenizer.to_str())
    ref.encode_special_tokens = True
    return [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]


def weird_texts(count, seed=0):
    """Strings stressing GPT-2's split: every kind of whitespace (ASCII, Unicode, and \\x1c which Python but not
    Unicode calls a space), contractions, digits, symbols, accents, CJK, emoji, combining marks, special-token
    strings."""
    rng = random.Random(seed)
    alphabet = list("abcXYZ019 '\t\n\r\x0b\x0c.,;!?-_<>/\"sdtmlvre") + [
        "\u00e9", "\u00a0", "\u2028", "\x1c", "\x85", "\u3000", "\u4e2d", "\U0001F600", "\u0301", "\u00b2",
        "\u2163", "\n\n", " \n", "'s", "'ll", "'S", "<s>", "<mask>", "</s>", "  ", "\n "]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(count)]
    # Long stretches without an ASCII space (as in Chinese text) take the encoder's uncached route.
    unspaced = [c for c in alphabet if not any(s in c for s in " \t\n\r\x0b\x0c")]
    texts += ["".join(rng.choice(unspaced) for _ in range(rng.randint(60, 200))) for _ in range(count // 10)]
    return texts


def split_flat(flat, lengths):
    return [list(x) for x in np.split(flat, np.cumsum(lengths)[:-1])]


def test_trained_tokenizer_has_robertas_special_tokens(tokenizer):
    assert special_ids(tokenizer) == {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}
    assert tokenizer.get_vocab_size() == 700
    enc = tokenizer.encode("Before we proceed")
    assert enc.ids[0] == 0 and enc.ids[-1] == 2
    assert tokenizer.decode(enc.ids) == "Before we proceed"
    # Byte-level: any text round-trips, with no <unk>.
    text = "na\u00efve \u4e2d\u6587 \U0001F600 \x00"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert 3 not in ids and tokenizer.decode(ids) == text


def test_vocab_size_too_small_is_rejected():
    with pytest.raises(ValueError, match=str(MIN_VOCAB_SIZE)):
        train_tokenizer(["some text"], vocab_size=MIN_VOCAB_SIZE - 1)


@pytest.mark.parametrize("corpus", ["shakespeare", "weird", "weird-again"])
def test_document_encoder_matches_rust_tokenizer(tokenizer, corpus):
    docs = SHAKESPEARE_DOCS[600:1600] if corpus == "shakespeare" else weird_texts(1500, seed=len(corpus))
    encoder = DocumentEncoder(tokenizer)
    if corpus == "weird-again":   # a warm cache must give the same answer as a cold one
        encoder.encode(docs[::-1])
    flat, lengths = encoder.encode(docs, np.int64)
    assert len(lengths) == len(docs)
    for doc, ids, expected in zip(docs, split_flat(flat, lengths), rust_ids(tokenizer, docs)):
        assert ids == expected, repr(doc)


def test_document_encoder_without_fast_path_matches(tokenizer):
    # A pre-tokenizer other than GPT-2's turns the fast path off; the answer must not change.
    spec = json.loads(tokenizer.to_str())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    other = Tokenizer.from_str(json.dumps(spec))
    docs = weird_texts(200, seed=5) + SHAKESPEARE_DOCS[:50]
    encoder = DocumentEncoder(other)
    assert not encoder._fast
    flat, lengths = encoder.encode(docs, np.uint16)
    assert flat.dtype == np.uint16
    assert split_flat(flat, lengths) == rust_ids(other, docs)


def test_special_token_text_is_plain_text(tokenizer):
    flat, _ = DocumentEncoder(tokenizer).encode(["a <mask> b </s> <s>"])
    assert not set(flat.tolist()) & set(special_ids(tokenizer).values())


def test_load_tokenizer_formats(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path / "full")
    text = "Shall I compare thee to a summer's day?\nThou art more lovely <mask> temperate."
    expected = tokenizer.encode(text).ids
    assert load_tokenizer(tmp_path / "full").encode(text).ids == expected
    assert load_tokenizer(tmp_path / "full" / "tokenizer.json").encode(text).ids == expected
    # RoBERTa's original format: vocab.json + merges.txt only.
    (tmp_path / "bpe").mkdir()
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "bpe" / name).write_bytes((tmp_path / "full" / name).read_bytes())
    from_bpe = load_tokenizer(tmp_path / "bpe")
    assert from_bpe.encode(text).ids == expected
    assert load_tokenizer(tmp_path / "bpe" / "vocab.json").encode(text).ids == expected
    assert special_ids(from_bpe) == special_ids(tokenizer)


def test_load_tokenizer_bad_inputs(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(tmp_path / "lonely")
    bert_like = Tokenizer(models.BPE())
    bert_like.pre_tokenizer = pre_tokenizers.ByteLevel()
    bert_like.add_special_tokens(["[CLS]", "[SEP]", "[PAD]"])
    bert_like.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="<s>"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "junk.json").write_text("not json")
    with pytest.raises(ValueError, match="junk.json"):
        load_tokenizer(tmp_path / "junk.json")


def test_saved_tokenizer_loads_in_transformers(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_tokenizer(tokenizer, tmp_path, model_max_length=256)
    assert {"tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json",
            "tokenizer_config.json"} <= set(os.listdir(tmp_path))
    text = "Good morrow, cousin.\nWhat's the news? 42 ducats <mask> the\u00a0caf\u00e9."
    expected = tokenizer.encode(text).ids
    for cls in (transformers.RobertaTokenizerFast, transformers.RobertaTokenizer, transformers.AutoTokenizer):
        hf = cls.from_pretrained(str(tmp_path))
        assert hf(text)["input_ids"] == expected, cls
        assert (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id, hf.mask_token_id) == (0, 1, 2, 4)
        assert hf.model_max_length == 256
        assert len(hf) == tokenizer.get_vocab_size()
    # The vocab.json + merges.txt pair alone is what the pre-tokenizers.json loaders read.
    os.remove(tmp_path / "tokenizer.json")
    hf = transformers.RobertaTokenizerFast.from_pretrained(str(tmp_path))
    assert hf(text)["input_ids"] == expected
