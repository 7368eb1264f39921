"""Pretokenization: corpus formats, exact shard round trip, the validation split, the cache and bad inputs."""
import gzip
import json
import os
import sys
import types

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from fastroberta.data import cache, documents, shards
from fastroberta.config import RobertaConfig
from fastroberta.data import PreparedDataset, default_corpus_path, prepare_dataset
from fastroberta.data.documents import iter_documents, resolve_sources

DOCS = list(iter_documents(resolve_sources(None)))[:300]


def write_text(path, docs, sep="\n\n"):
    path.write_text(sep.join(docs) + "\n", encoding="utf-8")
    return path


def prepare(data, cache, **kwargs):
    kwargs.setdefault("vocab_size", 400)
    kwargs.setdefault("show_progress", False)
    return prepare_dataset(data, cache_dir=cache, **kwargs)


def split_docs(prepared, split):
    """The documents of a split as id lists, checking each is followed by exactly one </s>."""
    tokens, offsets = prepared.tokens(split), prepared.doc_offsets(split)
    eos = prepared.special_ids["eos"]
    assert offsets[0] == 0 and offsets[-1] == len(tokens) == prepared.num_tokens(split)
    assert len(offsets) - 1 == prepared.num_documents(split)
    out = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        assert tokens[b - 1] == eos and eos not in tokens[a:b - 1]
        out.append(tokens[a:b - 1].tolist())
    return out


def encoded(prepared, docs):
    return [e.ids for e in prepared.tokenizer.encode_batch(docs, add_special_tokens=False)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return write_text(root / "plays.txt", DOCS)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    return prepare(corpus, tmp_path_factory.mktemp("cache"), val_fraction=0.1)


def test_default_corpus_is_bundled():
    path = default_corpus_path()
    assert os.path.isfile(path) and path.endswith("tinyshakespeare.txt")
    assert resolve_sources(None) == [("text", path)]


def test_shards_round_trip(prepared):
    assert prepared.dtype == np.uint16
    assert prepared.special_ids == {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}
    train, val = split_docs(prepared, "train"), split_docs(prepared, "val")
    # Every document lands in exactly one split, in corpus order, its ids exactly the tokenizer's.
    expected = encoded(prepared, DOCS)
    assert sorted(train + val) == sorted(expected)
    assert [d for d in expected if d in val] == val
    assert 10 <= len(val) <= 60      # ~10% of 300 documents
    # Read back with the text intact.
    assert prepared.tokenizer.decode(train[0]) == DOCS[0] or prepared.tokenizer.decode(val[0]) == DOCS[0]


def test_documents_split_at_blank_lines(tmp_path):
    text = "  one\nline two\n\n\n \t \nthree\r\n\r\nfour \n\n\n"
    path = tmp_path / "a.txt"
    path.write_text(text)
    assert list(iter_documents(resolve_sources(path))) == ["one\nline two", "three", "four"]


def test_documents_across_read_blocks(tmp_path, monkeypatch):
    # Documents and multi-byte characters straddling the reader's block boundary come out whole.
    monkeypatch.setattr(documents, "_BLOCK_BYTES", 7)
    docs = ["caf\u00e9 \u4e2d\u6587 one", "two two two", "x", "\U0001F600 four"]
    path = write_text(tmp_path / "a.txt", docs, sep="\n \n\n")
    assert list(iter_documents(resolve_sources(path))) == docs


def test_jsonl_folder_and_gzip(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    write_text(folder / "a.txt", DOCS[:3])
    with open(folder / "sub" / "b.jsonl", "w") as f:
        for doc in DOCS[3:6]:
            f.write(json.dumps({"text": doc, "id": 1}) + "\n")
        f.write("\n")   # blank lines are skipped
    with gzip.open(folder / "c.md.gz", "wt") as f:
        f.write("\n\n".join(DOCS[6:8]))
    (folder / "notes.py").write_text("print('not a corpus file')")
    (folder / ".hidden" / "d.txt").write_text("hidden")
    assert [kind for kind, _ in resolve_sources(folder)] == ["text", "text", "jsonl"]
    assert list(iter_documents(resolve_sources(folder))) == DOCS[:3] + DOCS[6:8] + DOCS[3:6]


def test_parallel_pretokenization_matches_serial(tmp_path):
    path = write_text(tmp_path / "big.txt", DOCS * 2)   # ~120 KB: several chunks for two workers
    tokenizer = cache.get_tokenizer(None, resolve_sources(path), [], str(tmp_path / "c"), 400, False)
    one = prepare(path, tmp_path / "c1", tokenizer=tokenizer, num_workers=1)
    two = prepare(path, tmp_path / "c2", tokenizer=tokenizer, num_workers=2)
    for split in ("train", "val"):
        assert np.array_equal(one.tokens(split), two.tokens(split))
        assert np.array_equal(one.doc_offsets(split), two.doc_offsets(split))


def test_validation_split_sizes(tmp_path):
    for n in (2, 3, 5):
        p = prepare(write_text(tmp_path / f"n{n}.txt", DOCS[:n]), tmp_path / "c", val_fraction=0.5)
        assert p.num_documents("train") >= 1 and p.num_documents("val") >= 1
        assert p.num_documents("train") + p.num_documents("val") == n
    p = prepare(write_text(tmp_path / "few.txt", DOCS[:20]), tmp_path / "c", val_fraction=0.01)
    assert p.num_documents("val") == 1 and p.num_documents("train") == 19
    p = prepare(tmp_path / "few.txt", tmp_path / "c", val_fraction=0.0)
    assert p.num_documents("val") == 0 and p.num_tokens("val") == 0 and len(p.tokens("val")) == 0
    p = prepare(write_text(tmp_path / "one.txt", DOCS[:1]), tmp_path / "c")
    assert p.num_documents("val") == 0 and p.num_documents("train") == 1


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    path = write_text(tmp_path / "a.txt", DOCS[:50])
    first = prepare(path, tmp_path / "c")
    calls = []
    real = shards.write_shards
    monkeypatch.setattr(shards, "write_shards", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = prepare(path, tmp_path / "c")
    assert again.path == first.path and not calls
    other_split = prepare(path, tmp_path / "c", val_fraction=0.2)
    assert other_split.path != first.path and len(calls) == 1
    with open(path, "a") as f:
        f.write("\nA new document.\n")
    changed = prepare(path, tmp_path / "c")
    assert changed.path != first.path and len(calls) == 2
    assert changed.num_documents("train") + changed.num_documents("val") == 51


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    path = write_text(tmp_path / "a.txt", DOCS[:50])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards.tok, "save_tokenizer", crash)   # after the shards are written, before meta.json
    with pytest.raises(KeyboardInterrupt):
        prepare(path, tmp_path / "c")
    leftovers = [e for e in os.listdir(tmp_path / "c") if not e.endswith(".lock") and e != "tokenizers"]
    assert leftovers == []
    monkeypatch.undo()
    p = prepare(path, tmp_path / "c")
    assert p.num_documents("train") + p.num_documents("val") == 50
    # A half-written folder (as a crash without the atomic rename would leave) is rebuilt, not trusted.
    os.truncate(os.path.join(p.path, "train.bin"), 10)
    with pytest.raises(ValueError, match="not a complete"):
        PreparedDataset(p.path)
    assert prepare(path, tmp_path / "c").num_tokens("train") == p.num_tokens("train")


def test_uint32_shards_for_large_vocabularies(tmp_path):
    # A vocabulary over 65,535 entries: 256 byte symbols, RoBERTa's specials, and fillers.
    byte_symbols = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + sorted(byte_symbols))}
    vocab.update({f"filler{i}": len(vocab) + i for i in range(70000)})
    vocab["<mask>"] = len(vocab)
    big = Tokenizer(models.BPE(vocab, []))
    big.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    big.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    p = prepare(write_text(tmp_path / "a.txt", DOCS[:20]), tmp_path / "c", tokenizer=big)
    assert p.dtype == np.uint32 and p.vocab_size > 65535
    assert sorted(split_docs(p, "train") + split_docs(p, "val")) == sorted(encoded(p, DOCS[:20]))


def test_check_vocab(prepared):
    prepared.check_vocab(prepared.vocab_size)
    prepared.check_vocab(RobertaConfig.tiny(vocab_size=prepared.vocab_size))
    with pytest.raises(ValueError, match=f"vocab_size={prepared.vocab_size}"):
        prepared.check_vocab(50265)
    with pytest.raises(ValueError, match="vocab_size"):
        prepared.check_vocab(prepared.vocab_size - 1, allow_larger=True)
    prepared.check_vocab(prepared.vocab_size + 64, allow_larger=True)
    with pytest.raises(ValueError, match="pad_token_id"):
        prepared.check_vocab(RobertaConfig.tiny(vocab_size=prepared.vocab_size, pad_token_id=3))
    with pytest.raises(TypeError):
        prepared.check_vocab("big")


def test_saved_tokenizer_beside_shards(prepared, tmp_path):
    transformers = pytest.importorskip("transformers")
    prepared.save_tokenizer(tmp_path)
    hf = transformers.RobertaTokenizerFast.from_pretrained(str(tmp_path))
    assert hf(DOCS[0])["input_ids"] == prepared.tokenizer.encode(DOCS[0]).ids
    # The dataset folder itself is a loadable tokenizer folder too.
    hf = transformers.AutoTokenizer.from_pretrained(prepared.path)
    assert hf(DOCS[1])["input_ids"] == prepared.tokenizer.encode(DOCS[1]).ids


# --- bad inputs -------------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_corpus.txt"):
        prepare(tmp_path / "no_such_corpus.txt", tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no_tokenizer"):
        prepare(None, tmp_path / "c", tokenizer=tmp_path / "no_tokenizer")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n\t\n")
    with pytest.raises(ValueError, match="empty"):
        prepare(tmp_path / "empty.txt", tmp_path / "c")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.py").write_text("x = 1")
    with pytest.raises(ValueError, match="no corpus files"):
        prepare(tmp_path / "folder", tmp_path / "c")
    assert [e for e in os.listdir(tmp_path / "c") if e.startswith("empty") and not e.endswith(".lock")] == []


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good text here\n\nbad \xff\xfe bytes and \xc3 a cut\n\nfine again")
    with pytest.warns(UnicodeWarning, match=r"bad.txt: replaced 3 invalid UTF-8"):
        docs = list(iter_documents(resolve_sources(path)))
    assert docs[1] == "bad \ufffd\ufffd bytes and \ufffd a cut"
    with pytest.warns(UnicodeWarning, match="replaced 3"):
        p = prepare(path, tmp_path / "c", val_fraction=0.0)
    assert p.num_documents("train") == 3


@pytest.mark.parametrize("line, message", [
    ('{"text": "fine"}\n{"text": "ok"}\n{"txt": "oops"}\n', r"bad.jsonl, line 3: .*no \"text\" field"),
    ('{"text": "fine"}\n{"text": "unterminated\n', r"bad.jsonl, line 2: invalid JSON"),
    ('{"text": 7}\n', r"bad.jsonl, line 1: \"text\" must be a string"),
    ('["text"]\n', r"bad.jsonl, line 1: .*no \"text\" field"),
])
def test_bad_jsonl(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line)
    with pytest.raises(ValueError, match=message):
        list(iter_documents(resolve_sources(path)))
    with pytest.raises(ValueError, match=message):
        prepare(path, tmp_path / "c")


def test_bad_arguments(tmp_path, corpus):
    with pytest.raises(ValueError, match="val_fraction"):
        prepare(corpus, tmp_path / "c", val_fraction=1.0)
    with pytest.raises(ValueError, match="num_workers"):
        prepare(corpus, tmp_path / "c", num_workers=0)
    with pytest.raises(ValueError, match="vocab_size"):
        prepare(corpus, tmp_path / "c", vocab_size=100)


def test_huggingface_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="datasets"):
        prepare("hf:wikitext", tmp_path / "c")
    with pytest.raises(ValueError, match="hf:<name>"):
        resolve_sources("hf:")

    class FakeDataset(list):
        column_names = ["text", "title"]
        _fingerprint = "abc123"

    requests = []

    def load_dataset(name, config, split):
        requests.append((name, config, split))
        return FakeDataset([{"text": d, "title": "t"} for d in DOCS[:30]] + [{"text": "  ", "title": "blank"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    p = prepare("hf:fake/plays:default:validation", tmp_path / "c")
    assert requests[0] == ("fake/plays", "default", "validation")
    assert sorted(split_docs(p, "train") + split_docs(p, "val")) == sorted(encoded(p, DOCS[:30]))
    assert documents._parse_hf("hf:name") == ("name", None, "train")
