"""fastroberta-finetune: the metrics against hand-computed values, the data forms (CSV, TSV, JSONL, pairs,
truncation, dynamic padding), one-line errors, and in-process runs of a tiny model on CPU (fp32): outputs,
transformers loading the kept model, exact resume, the output lock and a regression task."""
import json
import math
import os

import numpy as np
import pytest
import torch

from fastroberta import RobertaConfig, RobertaForSequenceClassification
from fastroberta import finetune as ft
from fastroberta import tasks
from fastroberta.training.metrics import read_metrics
from tiny_models import tiny_model


# ----------------------------------------------------------------------------------------------------------
# Metrics (values worked out by hand in the comments)
# ----------------------------------------------------------------------------------------------------------
def test_accuracy_and_f1():
    assert tasks.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    # tp = 2 (rows 0, 3), fp = 1 (row 1), fn = 1 (row 4): F1 = 2tp / (2tp + fp + fn) = 4 / 6
    assert tasks.f1_score([1, 1, 0, 1, 0], [1, 0, 0, 1, 1]) == pytest.approx(4 / 6)
    assert tasks.f1_score([0, 0], [0, 0]) == 0.0  # no positives anywhere: F1 taken as 0


def test_matthews_correlation():
    # tp = 2, tn = 1, fp = 1, fn = 1: (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = 1 / sqrt(3*3*2*2)
    assert tasks.matthews_corrcoef([1, 1, 0, 1, 0], [1, 0, 0, 1, 1]) == pytest.approx(1 / 6)
    assert tasks.matthews_corrcoef([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert tasks.matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # a constant prediction: undefined, 0


def test_pearson_and_spearman():
    # x - mean = (-1.5, -.5, .5, 1.5), y - mean = (-3, -1, 0, 4): 11 / sqrt(5 * 26)
    assert tasks.pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    # tied ranks averaged: x ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4): 4.5 / sqrt(4.5 * 5)
    assert tasks.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert tasks.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)


def test_task_metrics_pick_the_glue_metric():
    assert set(tasks.compute_metrics(tasks.GLUE["mrpc"], [1, 0], [1, 1])) == {"accuracy", "f1"}
    assert set(tasks.compute_metrics(tasks.GLUE["cola"], [1, 0], [1, 1])) == {"accuracy", "mcc"}
    assert set(tasks.compute_metrics(tasks.GLUE["stsb"], [1., 2.], [1., 3.])) == {"pearson", "spearman"}
    assert [tasks.GLUE[t].num_labels for t in ("mnli", "qnli", "stsb", "sst2")] == [3, 2, 1, 2]


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
PAIR = tasks.get_task("classification", text_fields="a,b", label_field="y")


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl"])
def test_every_file_form_reads_the_same_pairs(tmp_path, ext):
    rows = [("It's \"quoted\", here", "second", "yes"), ("plain", "with\ttab-free text", "no")]
    if ext == "jsonl":
        text = "".join(json.dumps({"a": a, "b": b, "y": y}) + "\n" for a, b, y in rows)
    elif ext == "csv":
        text = 'a,b,y\n"It\'s ""quoted"", here",second,yes\nplain,with\ttab-free text,no\n'
    else:  # GLUE-style TSV: quotes are plain characters
        rows = [("It's \"quoted\", here", "second", "yes"), ("plain", "two words", "no")]
        text = "a\tb\ty\n" + "".join("\t".join(r) + "\n" for r in rows)
    split = tasks.read_split(write(tmp_path / f"d.{ext}", text), "train", PAIR)
    assert split.texts == [r[:2] for r in rows]
    assert split.labels == ["yes", "no"]
    names = tasks.label_names(PAIR, split)
    assert names == ["no", "yes"]
    assert tasks.encode_labels(PAIR, split, names).tolist() == [1, 0]


def test_numeric_class_names_sort_as_numbers(tmp_path):
    task = tasks.get_task("classification")
    split = tasks.read_split(write(tmp_path / "d.jsonl", "".join(
        json.dumps({"text": "x", "label": v}) + "\n" for v in (10, 2, 1, 2))), "train", task)
    assert tasks.label_names(task, split) == ["1", "2", "10"]


class _Enc:
    def __init__(self, ids):
        self.ids = ids


class _Tok:
    """Each word one token: its length."""

    def encode_batch(self, texts, add_special_tokens=False):
        return [_Enc([len(w) + 10 for w in t.split()]) for t in texts]


def test_pairs_truncate_longest_first_in_robertas_format():
    special = {"bos": 0, "eos": 2}
    split = tasks.Split("train", "x", [("a bb ccc dddd eeeee ffffff", "g hh")], ["1"], [1])
    (ids,) = tasks.tokenize(split, _Tok(), 10, special)
    # budget 10 - 4 specials = 6: the 6-token first text gives up 2, the 2-token second keeps both
    assert ids == [0, 11, 12, 13, 14, 2, 2, 11, 12, 2]
    single = tasks.Split("train", "x", [("a bb ccc dddd",)], ["1"], [1])
    assert tasks.tokenize(single, _Tok(), 5, special) == [[0, 11, 12, 13, 2]]
    assert tasks.truncate_pair([1] * 3, [1] * 9, 8) == ([1] * 3, [1] * 5)


def test_batches_pad_to_their_longest_row_and_cover_each_epoch():
    ids = [[0] + [5] * n + [2] for n in range(1, 41)]
    labels = np.arange(40) % 2
    loader = tasks.TaskLoader(ids, labels, pad_id=1, micro_batch_size=4, global_batch_size=8, seed=3,
                              group_by_length=True)
    it = iter(loader)
    seen = []
    for _ in range(10):  # one epoch: 5 global batches x 2 micro-batches
        b = next(it)
        lengths = b["attention_mask"].sum(1)
        assert b["input_ids"].shape[1] == int(lengths.max())
        assert (b["input_ids"][b["attention_mask"] == 0] == 1).all()
        seen += lengths.tolist()
    assert sorted(seen) == list(range(3, 43))
    assert loader.epoch == 0 and loader.position == 5
    # grouped by length: every micro-batch spans a narrow range
    first = tasks.TaskLoader(ids, labels, 1, 4, 8, seed=3, group_by_length=True)
    b = next(iter(first))
    assert b["attention_mask"].sum(1).max() - b["attention_mask"].sum(1).min() <= 8


def test_batches_round_their_length_up_to_a_multiple_within_the_limit():
    assert [tasks.padded_length(n, 8) for n in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 24]
    assert tasks.padded_length(121, 64, limit=128) == 128 and tasks.padded_length(100, 64, limit=100) == 100
    assert tasks.padded_length(130, 64, limit=128) == 130  # a row past the limit is never cut here
    ids = [[0] + [5] * n + [2] for n in range(1, 41)]
    loader = tasks.TaskLoader(ids, np.arange(40) % 2, pad_id=1, micro_batch_size=4, global_batch_size=8, seed=3,
                              pad_multiple=16, pad_limit=40)
    it = iter(loader)
    for _ in range(10):
        b = next(it)
        longest = int(b["attention_mask"].sum(1).max())
        assert b["input_ids"].shape[1] == min(-(-longest // 16) * 16, max(40, longest))
        assert (b["input_ids"][b["attention_mask"] == 0] == 1).all()
    batches = list(tasks.eval_batches(ids[:5], 4, 1, pad_multiple=8))
    assert [b["input_ids"].shape[1] for _, b in batches] == [8, 8]


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_padding_to_a_multiple_leaves_the_logits_unchanged(kernels):
    torch.manual_seed(0)
    config = RobertaConfig.preset("tiny", vocab_size=60, num_labels=3)
    model = RobertaForSequenceClassification(config, kernels=kernels).eval()
    ids = [[0] + list(range(5, 5 + n)) + [2] for n in (3, 9, 17)]
    exact = tasks.collate(ids, config.pad_token_id)
    rounded = tasks.collate(ids, config.pad_token_id, multiple=16)
    assert exact["input_ids"].shape[1] == 19 and rounded["input_ids"].shape[1] == 32
    with torch.no_grad():
        a = model(**ft.model_inputs(exact, torch.device("cpu"))).logits
        b = model(**ft.model_inputs(rounded, torch.device("cpu"))).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_word_order_task_is_deterministic_and_balanced():
    a, b = tasks.word_order_task(), tasks.word_order_task()
    assert a == b
    assert len(a["train"]) == 2000 and len(a["validation"]) == 500
    assert sum(r["label"] == "shuffled" for r in a["validation"]) == 250
    assert not {r["text"] for r in a["train"]} & {r["text"] for r in a["validation"]}
    assert all(6 <= len(r["text"].split()) <= 14 for r in a["train"])


# ----------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny RoBERTa folder (random weights) with a 400-entry tokenizer trained on the bundled corpus."""
    root = tmp_path_factory.mktemp("ft_model")
    rows = tasks.word_order_task()
    tiny_model(root, [r["text"] for r in rows["train"]])
    data = root / "data"
    data.mkdir()
    for name, n in (("train", 128), ("validation", 48), ("test", 40)):
        tasks.write_jsonl(rows[name][:n], str(data / f"{name}.jsonl"))
    return root


def run(model_dir, out, *extra):
    d = model_dir / "data"
    argv = ["--model", str(model_dir), "--task", "classification", "--train", str(d / "train.jsonl"),
            "--validation", str(d / "validation.jsonl"), "--precision", "fp32", "--micro-batch-size", "8",
            "--global-batch-size", "16", "--epochs", "2", "--lr", "1e-3", "--max-seq-len", "32", "--no-progress",
            "--log-every", "1", "--output", str(out), *extra]
    return ft.finetune(argv)


def test_run_outputs_and_transformers_loads_the_kept_model(model_dir, tmp_path):
    out = tmp_path / "run"
    summary = run(model_dir, out, "--test", str(model_dir / "data" / "test.jsonl"), "--eval-every", "4")
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 17))  # 128 / 16 = 8 steps per epoch, 2 epochs
    evals = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [4, 8, 12, 16]
    best = json.loads((out / "best.json").read_text())
    assert best["accuracy"] == max(r["eval_accuracy"] for r in evals) == summary["best"]["metric"]
    assert best["step"] == min(r["step"] for r in evals if r["eval_accuracy"] == best["accuracy"])
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 40 and {p["prediction"] for p in preds} <= {"original", "shuffled"}
    assert summary["test"]["accuracy"] == pytest.approx(np.mean([p["prediction"] == p["label"] for p in preds]))

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(out / "hf")).eval()
    ours = RobertaForSequenceClassification.from_pretrained(str(out / "hf"), kernels="torch").eval()
    assert hf.config.id2label == {0: "original", 1: "shuffled"}
    tok = transformers.AutoTokenizer.from_pretrained(str(out / "hf"))
    enc = tok(["To be, or not to be", "that is the question here"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(hf(**enc).logits, ours(**enc).logits, rtol=1e-5, atol=1e-5)


def test_resume_matches_an_uninterrupted_run(model_dir, tmp_path):
    extra = ("--eval-every", "3", "--dropout", "0.1")
    run(model_dir, tmp_path / "full", *extra)
    first = run(model_dir, tmp_path / "cut", *extra, "--stop-at-step", "5")
    assert first["step"] == 5 and first["hf"] is None
    # Only --resume and the folder: run.json holds every other flag of the run (fp32 pinned, task, data...).
    assert ft.finetune(["--resume", "--output", str(tmp_path / "cut")])["step"] == 16
    full = read_metrics(str(tmp_path / "full" / "metrics.jsonl"))
    cut = read_metrics(str(tmp_path / "cut" / "metrics.jsonl"))
    keys = ("step", "loss", "lr", "eval_accuracy")
    assert [[r.get(k) for k in keys] for r in cut] == [[r.get(k) for k in keys] for r in full]
    a = RobertaForSequenceClassification.from_pretrained(str(tmp_path / "full" / "hf"), kernels="torch").state_dict()
    b = RobertaForSequenceClassification.from_pretrained(str(tmp_path / "cut" / "hf"), kernels="torch").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_run_predicts_the_test_split_under_autocast(model_dir, tmp_path):
    """write_predictions loads the fp32 hf/ export and predicts under autocast in the run's precision: on a GPU
    fp16/bf16, here CPU bf16 (the same code path; before the native models handled autocast it raised)."""
    out = tmp_path / "bf16"
    summary = run(model_dir, out, "--precision", "bf16", "--steps", "2", "--test",
                  str(model_dir / "data" / "test.jsonl"))
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 40 and 0 <= summary["test"]["accuracy"] <= 1


def _settings(model_dir, tmp_path, *argv):
    return ft.resolve_settings(ft.build_parser().parse_args(
        ["--model", str(model_dir), "--precision", "fp32", "--output", str(tmp_path / "out"), *argv]))


def test_the_task_is_inferred_from_a_users_file(model_dir, tmp_path, capsys):
    """--train without --task: 0/1 labels are classes (the word-order demo is the default only without data),
    fractions are scores, a GLUE spec names its task; mixed labels are one line asking for --task."""
    binary = write(tmp_path / "b.csv", "sentence,label\nhello there,0\ngood day,1\nfine,1\n")
    s = _settings(model_dir, tmp_path, "--train", binary, "--validation", binary, "--text-fields", "sentence")
    assert (s.task.name, s.task_inferred) == ("classification", True)
    scores = write(tmp_path / "s.jsonl", "".join(json.dumps({"text": t, "y": y}) + "\n"
                                                  for t, y in (("a b", 0.5), ("c", 3), ("d e f", 4.25))))
    s = _settings(model_dir, tmp_path, "--train", scores, "--label-field", "y")
    assert (s.task.name, s.task.regression) == ("regression", True)
    assert _settings(model_dir, tmp_path).task.name == "word-order"
    s = _settings(model_dir, tmp_path, "--train", binary, "--task", "regression", "--text-fields", "sentence")
    assert (s.task.name, s.task_inferred) == ("regression", False)
    mixed = write(tmp_path / "m.csv", "text,label\nx,good\ny,0.5\n")
    assert "pass --task" in _error(capsys, ["--model", str(model_dir), "--train", mixed, "--output",
                                            str(tmp_path / "o")])


@pytest.mark.slow
def test_compile_gives_eager_losses(model_dir, tmp_path):
    """--compile through DeepSpeed, evaluation and the checkpoint, against eager (dropout off: the classifier
    head's nn.Dropout draws from a different generator once compiled)."""
    extra = ["--steps", "4", "--eval-every", "4", "--dropout", "0", "--kernels", "torch"]
    run(model_dir, tmp_path / "eager", *extra)
    run(model_dir, tmp_path / "compiled", *extra, "--compile")
    eager, compiled = (read_metrics(str(tmp_path / d / "metrics.jsonl")) for d in ("eager", "compiled"))
    losses = [[r["loss"] for r in recs if "loss" in r] for recs in (eager, compiled)]
    assert len(losses[0]) == 4 and len(set(losses[0])) > 1
    np.testing.assert_allclose(losses[1], losses[0], rtol=0, atol=1e-5)
    accuracy = [[r["eval_accuracy"] for r in recs if "eval_accuracy" in r] for recs in (eager, compiled)]
    assert accuracy[0] == accuracy[1] and len(accuracy[0]) == 1
    assert (tmp_path / "compiled" / "hf" / "config.json").exists()


def test_regression_task(model_dir, tmp_path):
    d = tmp_path / "reg"
    d.mkdir()
    rows = tasks.word_order_task()["train"][:64]
    for name in ("train", "validation"):
        tasks.write_jsonl([{"text": r["text"], "score": float(len(r["text"].split()))} for r in rows],
                          str(d / f"{name}.jsonl"))
    summary = ft.finetune(["--model", str(model_dir), "--task", "regression", "--label-field", "score",
                           "--train", str(d / "train.jsonl"), "--validation", str(d / "validation.jsonl"),
                           "--precision", "fp32", "--micro-batch-size", "16", "--steps", "3", "--lr", "1e-3",
                           "--no-progress", "--output", str(tmp_path / "out")])
    assert set(summary["best"]["metrics"]) == {"pearson", "spearman"}
    cfg = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert cfg["problem_type"] == "regression" and len(cfg["id2label"]) == 1


# ----------------------------------------------------------------------------------------------------------
# Errors: one line, exit status 2
# ----------------------------------------------------------------------------------------------------------
def _error(capsys, argv):
    assert ft.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize("case, expected", [
    ("missing_field", "no field 'text'"),
    ("unknown_label", "unknown label 'maybe'"),
    ("empty", "holds no examples"),
    ("regression_text", "is not a number"),
    ("datasets", "needs the `datasets` package"),
    ("one_class", "only one value"),
    ("bad_json", 't.jsonl line 2 is not valid JSON: Expecting \',\' delimiter at the end of the line: a closing '
                 'brace or quote missing?'),
])
def test_bad_data_is_one_line(model_dir, tmp_path, capsys, monkeypatch, case, expected):
    good = str(model_dir / "data" / "train.jsonl")
    task, train, val = "classification", good, str(model_dir / "data" / "validation.jsonl")
    if case == "missing_field":
        train = write(tmp_path / "t.csv", "sentence,label\nhello there,a\n")
    elif case == "unknown_label":
        val = write(tmp_path / "v.jsonl", json.dumps({"text": "x", "label": "maybe"}) + "\n")
    elif case == "empty":
        val = write(tmp_path / "v.tsv", "text\tlabel\n")
    elif case == "regression_text":
        task = "regression"
        train = write(tmp_path / "t.jsonl", json.dumps({"text": "x y", "label": "high"}) + "\n")
    elif case == "datasets":
        try:
            import datasets  # noqa: F401
            pytest.skip("datasets is installed here")
        except ImportError:
            pass
        task, train, val = "sst2", "hf:glue:sst2", None
    elif case == "one_class":
        train = write(tmp_path / "t.jsonl", "".join(json.dumps({"text": "x", "label": "a"}) + "\n" for _ in range(3)))
    elif case == "bad_json":
        train = write(tmp_path / "t.jsonl", '{"text": "x", "label": "a"}\n{"text": "y", "label": "b"\n')
    # Every input is checked before DeepSpeed starts (its start took most of a minute on a busy 2-core machine).
    monkeypatch.setattr(ft, "init_distributed", lambda *a: pytest.fail("DeepSpeed started before the data check"))
    argv = ["--model", str(model_dir), "--task", task, "--train", train, "--precision", "fp32",
            "--output", str(tmp_path / "out")]
    if val:
        argv += ["--validation", val]
    line = _error(capsys, argv)
    assert expected in line, line


def test_flag_errors_are_one_line(model_dir, tmp_path, capsys):
    base = ["--model", str(model_dir), "--task", "classification", "--train",
            str(model_dir / "data" / "train.jsonl"), "--precision", "fp32"]
    assert "fewer than one global batch" in _error(capsys, base + ["--micro-batch-size", "512",
                                                                   "--output", str(tmp_path / "a")])
    assert "exceeds the model's position table" in _error(capsys, base + ["--max-seq-len", "512"])
    assert "needs --tokenizer" in _error(capsys, ["--model", "tiny", "--task", "word-order"])
    assert "neither hf/config.json nor config.json" in _error(capsys, base[:0] + ["--model", str(tmp_path)])
    assert "unknown --metric" in _error(capsys, base + ["--metric", "bleu"])
    assert "--pad-to-multiple-of must be positive, got 0" in _error(capsys, base + ["--pad-to-multiple-of", "0"])


def test_a_second_run_on_the_same_output_is_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    with ft.OutputLock(str(out)):
        line = _error(capsys, ["--model", str(model_dir), "--task", "classification", "--train",
                               str(model_dir / "data" / "train.jsonl"), "--output", str(out)])
    assert "is in use by another run" in line
    run(model_dir, out, "--steps", "1")
    assert "already holds a run" in _error(capsys, ["--model", str(model_dir), "--task", "classification",
                                                    "--train", str(model_dir / "data" / "train.jsonl"),
                                                    "--output", str(out)])


def test_help_documents_every_flag():
    text = ft.build_parser().format_help()
    for action in ft.build_parser()._actions:
        if action.help != "==SUPPRESS==" and action.option_strings:  # suppressed: the deepspeed launcher's
            assert action.help and action.help.strip(), action.option_strings
            assert all(flag in text for flag in action.option_strings), action.option_strings
    for source in ("hf:squad", "hf:squad_v2", "hf:race:all", "hf:swag:regular", "hf:conll2003"):
        assert source in " ".join(text.split()), source  # the default data of each benchmark task
    for flag in ("--model", "--task", "--train", "--validation", "--test", "--text-fields", "--label-field",
                 "--max-seq-len", "--group-by-length", "--precision", "--zero-stage", "--micro-batch-size",
                 "--global-batch-size", "--lr", "--epochs", "--steps", "--warmup-ratio", "--weight-decay",
                 "--seed", "--eval-every", "--output", "--resume", "--overwrite", "--kernels"):
        assert flag in text


def test_transformers_checkpoint_and_from_scratch(model_dir, tmp_path):
    """A folder written by transformers (with its own 3-class head, replaced for this 2-class task) is a valid
    --model; --from-scratch keeps its architecture and tokenizer but none of its weights."""
    transformers = pytest.importorskip("transformers")
    src = RobertaForSequenceClassification.from_pretrained(str(model_dir / "hf"), kernels="torch")
    hf_model = transformers.RobertaForSequenceClassification.from_pretrained(str(model_dir / "hf"), num_labels=3)
    folder = tmp_path / "hf_ckpt"
    hf_model.save_pretrained(str(folder))
    for name in os.listdir(model_dir / "hf"):
        if name.startswith(("tokenizer", "vocab", "merges", "special")):
            (folder / name).write_bytes((model_dir / "hf" / name).read_bytes())
    common = ["--steps", "1", "--lr", "1e-9", "--dropout", "0"]
    summary = ft.finetune(["--model", str(folder), "--task", "classification", "--train",
                           str(model_dir / "data" / "train.jsonl"), "--precision", "fp32", "--no-progress",
                           "--micro-batch-size", "16", "--max-seq-len", "32", "--output", str(tmp_path / "b"),
                           *common])
    assert summary["step"] == 1
    tuned = RobertaForSequenceClassification.from_pretrained(str(tmp_path / "b" / "hf"), kernels="torch")
    key = "roberta.layers.0.qkv.weight"
    assert torch.allclose(tuned.state_dict()[key], src.state_dict()[key], atol=1e-6)  # lr 1e-9: encoder kept
    assert tuned.config.num_labels == 2
    ft.finetune(["--model", str(folder), "--from-scratch", "--task", "classification", "--train",
                 str(model_dir / "data" / "train.jsonl"), "--precision", "fp32", "--no-progress",
                 "--micro-batch-size", "16", "--max-seq-len", "32", "--output", str(tmp_path / "c"), *common])
    fresh = RobertaForSequenceClassification.from_pretrained(str(tmp_path / "c" / "hf"), kernels="torch")
    assert fresh.state_dict()[key].shape == src.state_dict()[key].shape
    assert not torch.allclose(fresh.state_dict()[key], src.state_dict()[key], atol=1e-3)


def test_a_model_at_chance_is_said_to_miss_the_majority_baseline(model_dir, tmp_path, capsys):
    """Every example has the same text, so no model can do better than the majority class: the summary names the
    baseline next to the result and says that the model did not beat it; predictions carry the input text."""
    rows = lambda labels: "".join(json.dumps({"text": "the same words", "label": y}) + "\n"  # noqa: E731
                                  for y in labels)
    train = write(tmp_path / "train.jsonl", rows(["yes"] * 24 + ["no"] * 8))
    val = write(tmp_path / "val.jsonl", rows(["yes"] * 6 + ["no"] * 4))
    test = write(tmp_path / "test.jsonl", rows(["yes"] * 3 + ["no"] * 5))
    out = tmp_path / "out"
    summary = ft.finetune(["--model", str(model_dir), "--task", "classification", "--train", train,
                           "--validation", val, "--test", test, "--precision", "fp32", "--micro-batch-size", "8",
                           "--steps", "2", "--max-seq-len", "32", "--no-progress", "--output", str(out)])
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("baseline")]
    assert line == ["baseline, always 'yes' (the training split's majority class): accuracy 0.6000 on validation "
                    f"(the model: {summary['best']['metric']:.4f}), 0.3750 on test (the model: "
                    f"{summary['test']['accuracy']:.4f}); the model did NOT beat it on validation: it learned nothing "
                    "it can use from the text; train longer (--epochs, --steps), try another --lr, or give more "
                    "data"], err
    assert summary["baseline"]["beaten"] is False and summary["baseline"]["predicts"] == "yes"
    assert "the run takes 2 steps, few for fine-tuning" in err
    assert err.splitlines()[-1] in (f"loss curve: {out / 'loss.png'}", "loss.png not drawn: matplotlib is not "
                                    f"installed (pip install matplotlib, then python -m fastroberta.plot {out})")
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["text"] for p in preds] == ["the same words"] * 8 and [p["label"] for p in preds[:4]] == \
        ["yes", "yes", "yes", "no"]


def test_a_small_training_split_gets_enough_epochs_by_default(model_dir, tmp_path, capsys):
    train = write(tmp_path / "train.jsonl", "".join(json.dumps({"text": f"words {i}", "label": i % 2}) + "\n"
                                                    for i in range(300)))
    argv = ["--model", str(model_dir), "--task", "classification", "--train", train, "--precision", "fp32",
            "--output", str(tmp_path / "out")]
    args = ft.build_parser().parse_args(argv)
    s = ft.resolve_settings(args)
    ft.plan_schedule(args, s, 300)
    assert (s.steps_per_epoch, args.epochs, s.total_steps) == (9, 12.0, 108)
    assert ("300 training examples make 9 steps per epoch at global batch 32: 3 epochs would be 27 steps, too few "
            "to learn from; taking 12 epochs (108 steps)") in capsys.readouterr().err
    args = ft.build_parser().parse_args(argv + ["--epochs", "3"])  # the user's choice stands
    s = ft.resolve_settings(args)
    ft.plan_schedule(args, s, 300)
    assert s.total_steps == 27 and "few for fine-tuning" in capsys.readouterr().err


def test_progress_is_plain_lines_off_a_terminal(model_dir, tmp_path, capsys):
    """Without --no-progress and with stderr not a terminal (a pipe, a log file), the progress display is plain
    lines, as fastroberta-train's: no tqdm carriage returns."""
    d = model_dir / "data"
    ft.finetune(["--model", str(model_dir), "--task", "classification", "--train", str(d / "train.jsonl"),
                 "--precision", "fp32", "--micro-batch-size", "16", "--steps", "2", "--max-seq-len", "32",
                 "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "\r" not in err and "finetune: step 2/2 (100%)" in err, err


def test_resume_without_output_or_task_finds_the_run_folder(tmp_path, monkeypatch):
    """A run started with --train alone (its task inferred) writes to runs/finetune-<inferred task>; a --resume
    that gives neither --output nor --task reads that folder's run.json (its lr, not the default)."""
    from fastroberta.training.cli import parse_command_line
    data = write(tmp_path / "d.csv", "sentence,label\nhello there,0\ngood day,1\n")
    monkeypatch.chdir(tmp_path)
    assert ft.default_output_of(ft.build_parser().parse_args(["--train", data])) == os.path.join(
        "runs", "finetune-classification")
    assert ft.default_output_of(ft.build_parser().parse_args([])) == os.path.join("runs", "finetune-word-order")
    run_dir = tmp_path / "runs" / "finetune-classification"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"args": {"lr": 0.0123, "train": data}}))
    args = parse_command_line(ft.build_parser(), ["--train", data, "--resume"], ft.default_output_of)
    assert args.lr == 0.0123
