"""The token-classification family: CoNLL and JSONL readers, the label on each word's first sub-word (words
encoded with a leading space), per-word predictions, entity-level P/R/F1 in seqeval's default (conlleval-like)
mode against hand-computed values, token accuracy, the generated task and one-line data errors."""
import json

import pytest
import torch

from fastroberta.data.tokenizer import special_ids, train_tokenizer
from fastroberta.tasks.errors import DataError
from fastroberta.tasks.swapped_words import swapped_word_tags
from tiny_models import check_exact_resume, tiny_model, write_splits
from fastroberta.tasks.token_tags import (IGNORE, collate_tags, encode_tags, entities, read_tags, tag_features,
                                          tag_metrics, tag_names, word_predictions)

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

"""
WORDS = [["EU", "rejects", "German", "call", "."], ["Peter", "Blackburn"]]
TAGS = [["B-ORG", "O", "B-MISC", "O", "O"], ["B-PER", "I-PER"]]


@pytest.fixture(scope="module")
def tokenizer():
    rows = swapped_word_tags(n_train=200, n_validation=10, n_test=10)["train"]
    return train_tokenizer([" ".join(r["tokens"]) for r in rows], 400)


def test_conll_takes_the_first_and_last_columns_and_jsonl_reads_the_same(tmp_path):
    conll = tmp_path / "train.txt"
    conll.write_text(CONLL)
    split = read_tags(str(conll))
    assert split.words == WORDS and split.tags == TAGS
    assert split.places[1][0] == f"{conll} line 9"
    two_columns = tmp_path / "two.conll"
    two_columns.write_text("\n\nEU B-ORG\nrejects O\n\n\n\nPeter B-PER\nBlackburn I-PER")  # no blank line at the end
    assert read_tags(str(two_columns)).words == [["EU", "rejects"], ["Peter", "Blackburn"]]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"tokens": w, "tags": t}) + "\n" for w, t in zip(WORDS, TAGS)))
    split = read_tags(str(jsonl))
    assert split.words == WORDS and split.tags == TAGS
    assert tag_names(split) == ["O", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    words_only = tmp_path / "test.txt"
    words_only.write_text("EU\nrejects\n\nPeter\n")
    split = read_tags(str(words_only), "test", need_labels=False)
    assert split.words == [["EU", "rejects"], ["Peter"]] and split.tags is None


def test_the_first_sub_word_of_each_word_carries_its_label(tokenizer, tmp_path):
    special = special_ids(tokenizer)
    words = [["Romeo", "overreached", "Montague", "!"]]
    conll = tmp_path / "t.txt"
    conll.write_text("".join(f"{w} {t}\n" for w, t in zip(words[0], ["B-PER", "O", "B-PER", "O"])))
    split = read_tags(str(conll))
    names = ["O", "B-PER", "I-PER"]
    feats = tag_features(split, tokenizer, 64, special, encode_tags(split, names))
    pieces = [tokenizer.encode(" " + w, add_special_tokens=False).ids for w in words[0]]
    assert any(len(p) > 1 for p in pieces)  # a word of several sub-words is in the test
    assert feats.ids[0] == [special["bos"]] + sum(pieces, []) + [special["eos"]]
    expected, first, at = [IGNORE], [], 1
    for p, tag in zip(pieces, [1, 0, 1, 0]):
        expected += [tag] + [IGNORE] * (len(p) - 1)
        first.append(at)
        at += len(p)
    assert feats.labels[0] == expected + [IGNORE] and feats.first[0] == first
    batch = collate_tags(feats.ids + [[special["bos"], special["eos"]]], special["pad"],
                         feats.labels + [[IGNORE, IGNORE]], multiple=8)
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["labels"].shape == batch["input_ids"].shape
    assert batch["labels"][0, :len(expected) + 1].tolist() == expected + [IGNORE]
    assert (batch["labels"][:, len(expected) + 1:] == IGNORE).all() and (batch["labels"][1] == IGNORE).all()
    # Per-word predictions read the first sub-word; a word cut off by --max-seq-len is predicted O.
    token_preds = torch.zeros(1, len(feats.ids[0]), dtype=torch.long)
    token_preds[0, first[2]] = 1
    token_preds[0, first[2] + 1:first[3]] = 2  # later sub-words are not read
    assert word_predictions(token_preds, feats.first, names) == [["O", "O", "B-PER", "O"]]
    cut = tag_features(split, tokenizer, 1 + len(pieces[0]) + len(pieces[1]) + 1, special)
    assert cut.first[0] == first[:2] + [-1, -1] and cut.labels is None
    assert word_predictions(torch.ones(1, 10, dtype=torch.long), cut.first, names) == [["B-PER", "B-PER", "O", "O"]]


def test_the_features_train_the_token_head(tokenizer, tmp_path):
    from fastroberta.config import RobertaConfig
    from fastroberta.model import RobertaForTokenClassification
    special = special_ids(tokenizer)
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"tokens": w, "tags": t}) + "\n" for w, t in zip(WORDS, TAGS)))
    split = read_tags(str(jsonl))
    names = tag_names(split)
    feats = tag_features(split, tokenizer, 64, special, encode_tags(split, names))
    batch = collate_tags(feats.ids, special["pad"], feats.labels)
    config = RobertaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=80,
                           num_labels=len(names))
    model = RobertaForTokenClassification(config, kernels="torch")
    out = model(**batch)
    keep = batch["labels"] != IGNORE
    assert keep.sum().item() == 7  # one label per word, nothing else
    expected = torch.nn.functional.cross_entropy(out.logits[keep], batch["labels"][keep])
    torch.testing.assert_close(out.loss, expected)


def test_entities_read_iob_as_conlleval_does():
    # An I- after O starts an entity, a type change inside a span splits it, B- after B- is two entities, an
    # entity at the sentence end is closed there, and no entity runs across sentences.
    assert entities([["O", "I-PER", "I-PER", "O"]]) == {("PER", 0, 1, 2)}
    assert entities([["B-PER", "I-LOC", "I-LOC"]]) == {("PER", 0, 0, 0), ("LOC", 0, 1, 2)}
    assert entities([["B-PER", "B-PER"]]) == {("PER", 0, 0, 0), ("PER", 0, 1, 1)}
    assert entities([["O", "B-ORG"], ["I-ORG", "O"]]) == {("ORG", 0, 1, 1), ("ORG", 1, 0, 0)}
    assert entities([["B-LOC", "I-LOC", "E-LOC", "S-PER", "I-PER"]]) == {("LOC", 0, 0, 2), ("PER", 0, 3, 3),
                                                                           ("PER", 0, 4, 4)}


def test_entity_f1_and_token_accuracy_against_hand_computed_values():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "I-ORG"], ["B-MISC", "O"]]
    pred = [["I-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-LOC", "I-LOC"], ["O", "I-MISC"]]
    # Gold: PER 0-1, LOC 3, ORG 1-3, MISC 0 (4). Predicted: PER 0-1 and LOC 3 right (an I- start still counts
    # in this mode); ORG 1-1, LOC 2-3 and MISC at the sentence end wrong (5). Words: 3 + 2 + 0 of 10 right.
    m = tag_metrics(pred, gold)
    assert m == pytest.approx({"precision": 2 / 5, "recall": 2 / 4, "f1": 4 / 9, "accuracy": 5 / 10})
    assert tag_metrics(gold, gold) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "accuracy": 1.0}
    assert tag_metrics([["O", "O"]], [["B-PER", "O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                                           "accuracy": 0.5}


@pytest.mark.parametrize("content,name,expected", [
    ("EU B-ORG\nrejects O\n\nPeter B-PER\nBlackburn B-XYZ\n", "v.txt", "v.txt line 5: tag 'B-XYZ' is not in"),
    ("EU B-ORG\nrejects PER\n", "v.txt", "v.txt line 2: tag 'PER' is not in IOB form"),
    ("EU B-ORG\nrejects\n", "v.txt", "v.txt line 2: the word has no tag"),
    ('{"tokens": ["a", "b"], "tags": ["O"]}\n', "v.jsonl", "v.jsonl line 1: 'tags' must hold one tag per word"),
    ('{"words": ["a"]}\n', "v.jsonl", "v.jsonl line 1: 'tokens' must be a non-empty list of words"),
    ('\n{"tokens": ["a", "b"], "tags": ["O", "I-ORG"]}\n', "v.jsonl", "v.jsonl line 2 word 2: tag 'I-ORG' is not"),
])
def test_bad_data_is_one_line(tmp_path, content, name, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as e:
        encode_tags(read_tags(str(path), "validation"), ["O", "B-PER", "I-PER", "B-ORG"])
    assert "\n" not in str(e.value) and expected in str(e.value)


def test_finetune_token_classification_end_to_end_and_transformers_loads_the_kept_model(tmp_path):
    from fastroberta import finetune as ft
    from fastroberta.data.tokenizer import load_tokenizer
    from fastroberta.model import RobertaForTokenClassification
    from fastroberta.training.metrics import read_metrics
    from test_multiple_choice import finetune_args
    rows = swapped_word_tags(n_train=64, n_validation=32, n_test=24)
    model = tiny_model(tmp_path / "model", [" ".join(r["tokens"]) for r in rows["train"]])
    data = write_splits(tmp_path / "data", rows)
    out = tmp_path / "run"
    summary = ft.finetune(finetune_args(model, out, "token-classification", data, "--test",
                                        str(data / "test.jsonl")))
    evals = [r for r in read_metrics(str(out / "metrics.jsonl")) if "eval_f1" in r]
    assert [r["step"] for r in evals] == [4, 8] and {"eval_precision", "eval_recall", "eval_accuracy"} <= set(evals[0])
    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == "f1" and best["f1"] == max(r["eval_f1"] for r in evals)
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["tokens"] for p in preds] == [r["tokens"] for r in rows["test"]]
    assert all(len(p["prediction"]) == len(p["tokens"]) for p in preds)
    assert summary["test"] == pytest.approx(tag_metrics([p["prediction"] for p in preds],
                                                        [r["tags"] for r in rows["test"]]))

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForTokenClassification.from_pretrained(str(out / "hf")).eval()
    assert hf.config.id2label == {0: "O", 1: "B-SWAP", 2: "I-SWAP"}
    ours = RobertaForTokenClassification.from_pretrained(str(out / "hf"), kernels="torch").eval()
    tok = load_tokenizer(str(out / "hf"))
    sp = special_ids(tok)
    feats = tag_features(read_tags(str(data / "test.jsonl"), "test"), tok, 48, sp)
    batch = collate_tags(feats.ids[:3], sp["pad"])
    real = batch["attention_mask"].bool()  # padding positions' outputs are nobody's prediction
    assert not real.all()
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).logits[real], ours(**batch).logits[real], rtol=1e-5, atol=1e-5)


def test_finetune_ner_tag_outside_the_label_set_is_one_line(tmp_path, capsys):
    from fastroberta import finetune as ft
    from test_multiple_choice import finetune_args
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text(CONLL)
    (data / "validation.txt").write_text("Peter B-PER\nBlackburn I-PERSON\n")
    model = tiny_model(tmp_path / "model", [" ".join(w) for w in WORDS] * 20)
    argv = finetune_args(model, tmp_path / "run", "ner", data)
    argv[argv.index("--train") + 1] = str(data / "train.txt")
    argv[argv.index("--validation") + 1] = str(data / "validation.txt")
    assert ft.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert "validation.txt line 2: tag 'I-PERSON' is not in the label set (O, B-PER, I-PER" in err[-1]


def test_finetune_token_classification_resumes_exactly(tmp_path):
    from fastroberta.model import RobertaForTokenClassification
    from test_multiple_choice import finetune_args
    rows = swapped_word_tags(n_train=64, n_validation=32, n_test=8)
    model = tiny_model(tmp_path / "model", [" ".join(r["tokens"]) for r in rows["train"]])
    data = write_splits(tmp_path / "data", rows)
    first, _ = check_exact_resume(
        tmp_path, lambda out, *flags: finetune_args(model, out, "token-classification", data, "--eval-every", "3",
                                                    "--dropout", "0.1", *flags),
        5, RobertaForTokenClassification, ("step", "loss", "lr", "eval_f1", "eval_accuracy"))
    assert first["step"] == 5 and first["hf"] is None


def test_a_token_head_of_another_size_is_initialised_afresh_and_the_encoder_kept(tmp_path):
    """--model a NER checkpoint with 9 tags for a 3-tag task: the encoder loads, the head's weights of the wrong
    size are new (transformers' ignore_mismatched_sizes), and the run says so."""
    import dataclasses
    from fastroberta import finetune as ft
    from fastroberta.hf import read_config
    from fastroberta.model import RobertaForTokenClassification
    model = tiny_model(tmp_path / "model", [" ".join(w) for w in WORDS] * 5)
    cfg = dataclasses.replace(read_config(str(model / "hf")), num_labels=9)
    torch.manual_seed(1)
    RobertaForTokenClassification(cfg, kernels="torch").save_pretrained(str(tmp_path / "ner9"))
    for name in (model / "hf").iterdir():
        if name.name.startswith(("tokenizer", "vocab", "merges", "special")):
            (tmp_path / "ner9" / name.name).write_bytes(name.read_bytes())
    args = ft.build_parser().parse_args(["--model", str(tmp_path / "ner9"), "--task", "token-classification",
                                         "--train", "x.jsonl", "--output", str(tmp_path / "o")])
    s = ft.resolve_settings(args)
    built, origin = ft.build_model(args, s, ["O", "B-PER", "I-PER"])
    assert origin == "the checkpoint's head resized: classifier.bias, classifier.weight initialised afresh"
    saved = RobertaForTokenClassification.from_pretrained(str(tmp_path / "ner9"), kernels="torch").state_dict()
    assert built.config.num_labels == 3 and built.classifier.weight.shape[0] == 3
    assert all(torch.equal(v, saved[k]) for k, v in built.state_dict().items() if not k.startswith("classifier."))
