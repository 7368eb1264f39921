"""The multiple-choice family: RACE and SWAG readers in every form, features in RoBERTa's pair format with the
context truncated first, [B, C, L] batches that RobertaForMultipleChoice takes, accuracy, the generated task and
one-line data errors."""
import csv
import json

import numpy as np
import pytest

from fastroberta.data.tokenizer import special_ids, train_tokenizer
from fastroberta.tasks.errors import DataError
from fastroberta.tasks.multiple_choice import (choice_features, choice_metrics, collate_choices, read_choices,
                                               read_race, read_swag, truncate_context_first)
from fastroberta.tasks.swapped_words import swapped_line_choices
from tiny_models import check_exact_resume, tiny_model, write_splits

RACE_ROWS = [
    {"article": "Tom has a red bike.", "question": "What colour is the bike?",
     "options": ["blue", "red", "green", "black"], "answer": "B"},
    {"article": "Ann reads books.", "question": "Ann likes _ .",
     "options": ["books", "cars", "dogs", "rain"], "answer": "A"},
]


@pytest.fixture(scope="module")
def tokenizer():
    rows = swapped_line_choices(n_train=200, n_validation=10, n_test=10)["train"]
    return train_tokenizer([r["sent1"] for r in rows] + [r["ending0"] for r in rows], 400)


def _expected_race(split):
    assert split.contexts == ["Tom has a red bike.", "Ann reads books."]
    assert split.choices[0] == ["What colour is the bike? blue", "What colour is the bike? red",
                                "What colour is the bike? green", "What colour is the bike? black"]
    assert split.choices[1][1] == "Ann likes cars ."  # the option fills the cloze blank
    assert split.labels == [1, 0]


def test_race_reads_jsonl_a_json_list_and_the_original_per_article_files(tmp_path):
    jsonl = tmp_path / "race.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in RACE_ROWS) + "\n")
    _expected_race(read_race(str(jsonl)))
    listed = tmp_path / "race.json"
    listed.write_text(json.dumps(RACE_ROWS))
    _expected_race(read_race(str(listed)))
    folder = tmp_path / "RACE" / "train" / "high"
    folder.mkdir(parents=True)
    for i, r in enumerate(RACE_ROWS):
        original = {"id": f"{i}.txt", "article": r["article"], "questions": [r["question"]],
                    "options": [r["options"]], "answers": [r["answer"]]}
        (folder / f"{i}.txt").write_text(json.dumps(original))
    _expected_race(read_race(str(tmp_path / "RACE")))
    _expected_race(read_choices(str(jsonl)))


SWAG_HEADER = ["", "video-id", "fold-ind", "startphrase", "sent1", "sent2", "gold-source", "ending0", "ending1",
               "ending2", "ending3", "label"]


def test_swag_reads_its_csv_and_jsonl_and_startphrase_alone(tmp_path):
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SWAG_HEADER)
        w.writerow(["0", "v", "1", "She opens the door. She", "She opens the door.", "She", "gold",
                    "walks in.", "flies.", "sings, a song.", "sleeps.", "2"])
    for split in (read_swag(str(path)), read_choices(str(path))):
        assert split.contexts == ["She opens the door."]
        assert split.choices == [["She walks in.", "She flies.", "She sings, a song.", "She sleeps."]]
        assert split.labels == [2]
    jsonl = tmp_path / "swag.jsonl"
    jsonl.write_text(json.dumps({"startphrase": "He runs", "ending0": "a", "ending1": "b", "ending2": "c",
                                 "ending3": "d", "label": 3}) + "\n")
    split = read_choices(str(jsonl))
    assert split.contexts == ["He runs"] and split.choices == [["a", "b", "c", "d"]] and split.labels == [3]
    unlabelled = tmp_path / "test.jsonl"
    unlabelled.write_text(json.dumps({"sent1": "x", "sent2": "y", "ending0": "a", "ending1": "b",
                                      "ending2": "c", "ending3": "d"}) + "\n")
    assert read_swag(str(unlabelled), "test", need_labels=False).labels == [None]


def test_the_context_is_truncated_first_then_the_question_and_option():
    assert truncate_context_first(list(range(10)), [100, 101], 6) == (list(range(4)), [100, 101])
    assert truncate_context_first([1, 2], [100, 101], 6) == ([1, 2], [100, 101])
    assert truncate_context_first([1, 2], list(range(100, 108)), 6) == ([], list(range(100, 106)))


def test_features_are_robertas_pairs_and_batches_are_b_c_l(tokenizer, tmp_path):
    special = special_ids(tokenizer)
    jsonl = tmp_path / "race.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in RACE_ROWS) + "\n")
    split = read_race(str(jsonl))
    feats = choice_features(split, tokenizer, 64, special)
    assert len(feats) == 2 and all(len(ex) == 4 for ex in feats)
    article = tokenizer.encode("Tom has a red bike.", add_special_tokens=False).ids
    second = tokenizer.encode("What colour is the bike? red", add_special_tokens=False).ids
    bos, eos = special["bos"], special["eos"]
    assert feats[0][1] == [bos] + article + [eos, eos] + second + [eos]
    short = choice_features(split, tokenizer, len(second) + 6, special)
    assert short[0][1] == [bos] + article[:2] + [eos, eos] + second + [eos]  # the article lost its end
    batch = collate_choices(feats, special["pad"], split.labels, multiple=8)
    longest = max(len(x) for ex in feats for x in ex)
    assert batch["input_ids"].shape == (2, 4, -(-longest // 8) * 8)
    assert batch["labels"].tolist() == [1, 0]
    row = feats[1][3]
    assert batch["input_ids"][1, 3, :len(row)].tolist() == row
    assert batch["attention_mask"][1, 3].sum().item() == len(row)
    assert (batch["input_ids"][1, 3, len(row):] == special["pad"]).all()


def test_the_batches_run_through_the_multiple_choice_head(tokenizer, tmp_path):
    import torch
    from fastroberta.config import RobertaConfig
    from fastroberta.model import RobertaForMultipleChoice
    special = special_ids(tokenizer)
    jsonl = tmp_path / "race.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in RACE_ROWS) + "\n")
    split = read_race(str(jsonl))
    batch = collate_choices(choice_features(split, tokenizer, 64, special), special["pad"], split.labels)
    config = RobertaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=80)
    out = RobertaForMultipleChoice(config, kernels="torch")(**batch)
    assert out.logits.shape == (2, 4)
    assert torch.isfinite(out.loss)


def test_accuracy_takes_the_highest_scoring_choice():
    logits = np.array([[0.1, 0.9, 0.0, 0.0], [2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.5, 0.4]])
    assert choice_metrics(logits, [1, 1, 2]) == {"accuracy": pytest.approx(2 / 3)}


@pytest.mark.parametrize("row,expected", [
    ({**RACE_ROWS[0], "answer": "E"}, "line 1: answer 'E' is out of range for 4 options (A-D)"),
    ({**RACE_ROWS[0], "answer": "?"}, "line 1: answer '?' is not a letter A-D"),
    ({k: v for k, v in RACE_ROWS[0].items() if k != "options"}, "line 1: no field 'options'"),
    ({k: v for k, v in RACE_ROWS[0].items() if k != "answer"}, "line 1: no field 'answer'"),
    ({**RACE_ROWS[0], "options": ["a"]}, "line 1: 'options' must be a list of at least two strings"),
])
def test_bad_race_data_is_one_line(tmp_path, row, expected):
    path = tmp_path / "race.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        read_race(str(path))
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(path)) and expected in message


def test_bad_swag_data_is_one_line(tmp_path):
    path = tmp_path / "swag.jsonl"
    good = {"sent1": "x", "sent2": "y", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d", "label": 0}
    cases = [({**good, "label": 4}, "line 2: label 4 is out of range (0-3)"),
             ({k: v for k, v in good.items() if k != "ending2"}, "line 2: no field 'ending2'"),
             ({k: v for k, v in good.items() if k != "sent1"}, "line 2: no field 'sent1' or 'startphrase'")]
    for row, expected in cases:
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(DataError) as e:
            read_swag(str(path))
        assert "\n" not in str(e.value) and expected in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        read_choices(str(tmp_path / "missing.jsonl"))


def finetune_args(model, out, task, data, *extra):
    return ["--model", str(model), "--task", task, "--train", str(data / "train.jsonl"), "--validation",
            str(data / "validation.jsonl"), "--precision", "fp32", "--micro-batch-size", "8", "--global-batch-size",
            "16", "--epochs", "2", "--lr", "1e-3", "--max-seq-len", "48", "--no-progress", "--log-every", "1",
            "--output", str(out), *extra]


def test_finetune_swag_end_to_end_and_transformers_loads_the_kept_model(tmp_path):
    import torch
    from fastroberta import finetune as ft
    from fastroberta.model import RobertaForMultipleChoice
    from fastroberta.training.metrics import read_metrics
    rows = swapped_line_choices(n_train=64, n_validation=32, n_test=24)
    model = tiny_model(tmp_path / "model", [r["sent1"] for r in rows["train"]])
    data = write_splits(tmp_path / "data", rows)
    out = tmp_path / "run"
    summary = ft.finetune(finetune_args(model, out, "swag", data, "--test", str(data / "test.jsonl"),
                                        "--eval-every", "2"))
    evals = [r for r in read_metrics(str(out / "metrics.jsonl")) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8]  # 64 / 16 = 4 steps per epoch, 2 epochs
    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == "accuracy" and best["accuracy"] == max(r["eval_accuracy"] for r in evals)
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 24 and [p["label"] for p in preds] == [r["label"] for r in rows["test"]]
    assert summary["test"]["accuracy"] == pytest.approx(np.mean([p["prediction"] == p["label"] for p in preds]))

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForMultipleChoice.from_pretrained(str(out / "hf")).eval()
    ours = RobertaForMultipleChoice.from_pretrained(str(out / "hf"), kernels="torch").eval()
    from fastroberta.data.tokenizer import load_tokenizer
    tok = load_tokenizer(str(out / "hf"))
    split = read_swag(str(data / "test.jsonl"), "test")
    batch = collate_choices(choice_features(split, tok, 48, special_ids(tok))[:3], special_ids(tok)["pad"])
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).logits, ours(**batch).logits, rtol=1e-5, atol=1e-5)


def test_finetune_multiple_choice_resumes_exactly(tmp_path):
    """Stopped at step 3 of 6 and resumed: the same losses, evaluations and final weights as one run."""
    from fastroberta.model import RobertaForMultipleChoice
    rows = swapped_line_choices(n_train=48, n_validation=16, n_test=8)
    model = tiny_model(tmp_path / "model", [r["sent1"] for r in rows["train"]])
    data = write_splits(tmp_path / "data", rows)
    first, full = check_exact_resume(
        tmp_path, lambda out, *flags: finetune_args(model, out, "multiple-choice", data, "--eval-every", "2",
                                                    "--dropout", "0.1", *flags),
        3, RobertaForMultipleChoice, ("step", "loss", "lr", "eval_accuracy"))
    assert first["step"] == 3
    assert [r["step"] for r in full if "loss" in r][-1] == 6


def test_finetune_multiple_choice_data_errors_are_one_line(tmp_path, capsys):
    from fastroberta import finetune as ft
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({**RACE_ROWS[0], "answer": "F"}) + "\n")
    (data / "validation.jsonl").write_text(json.dumps(RACE_ROWS[0]) + "\n")
    model = tiny_model(tmp_path / "model", [r["article"] for r in RACE_ROWS] * 20)
    assert ft.main(finetune_args(model, tmp_path / "run", "race", data)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].endswith("train.jsonl line 1: answer 'F' is out of range for 4 options (A-D)")
