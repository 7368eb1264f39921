"""fastroberta-finetune --task qa / squad_v2: in-process runs of a tiny model on CPU (fp32) over windowed contexts:
evaluation by SQuAD F1, the kept model loadable as a question-answering model, predictions.json in the official
format, SQuAD 2.0's threshold carried from validation to the test split, and one-line errors."""
import json

import pytest
import torch

from fastroberta import RobertaForQuestionAnswering
from fastroberta import finetune as ft
from fastroberta.tasks.readers import write_jsonl
from fastroberta.tasks.swapped_words import swapped_span_questions
from fastroberta.training.errors import ConfigError
from fastroberta.training.metrics import read_metrics
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    """A tiny RoBERTa folder (random weights, a 400-entry tokenizer) and swapped-words JSONL splits, with and
    without unanswerable questions."""
    root = tmp_path_factory.mktemp("ft_qa")
    plain = swapped_span_questions(n_train=64, n_validation=16, n_test=12)
    with_none = swapped_span_questions(n_train=64, n_validation=16, n_test=12, unanswerable=True, seed=7)
    tiny_model(root, [r["context"] for r in plain["train"] + with_none["train"]])
    for kind, task in (("v1", plain), ("v2", with_none)):
        (root / kind).mkdir()
        for name, rows in task.items():
            write_jsonl(rows, str(root / kind / f"{name}.jsonl"))
    return root


def run(qa_dir, out, kind, task="qa", *extra):
    d = qa_dir / kind
    argv = ["--model", str(qa_dir), "--task", task, "--train", str(d / "train.jsonl"),
            "--validation", str(d / "validation.jsonl"), "--test", str(d / "test.jsonl"), "--precision", "fp32",
            "--micro-batch-size", "8", "--global-batch-size", "16", "--steps", "4", "--eval-every", "2",
            "--lr", "1e-3", "--max-seq-len", "64", "--doc-stride", "16", "--max-question-len", "24",
            "--no-progress", "--log-every", "1", "--output", str(out), *extra]
    return ft.finetune(argv)


def test_qa_run_evaluates_by_f1_and_writes_official_predictions(qa_dir, tmp_path):
    out = tmp_path / "run"
    summary = run(qa_dir, out, "v1")
    records = read_metrics(str(out / "metrics.jsonl"))
    evals = [r for r in records if "eval_f1" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(0 <= r["eval_exact"] <= r["eval_f1"] <= 100 for r in evals)
    assert "eval_HasAns_f1" not in evals[0]                  # no unanswerable question: SQuAD 1.1 rules
    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == "f1" and best["f1"] == max(r["eval_f1"] for r in evals) == summary["best"]["metric"]
    test_ids = [json.loads(line)["id"] for line in (qa_dir / "v1" / "test.jsonl").read_text().splitlines()]
    predictions = json.loads((out / "predictions.json").read_text())
    assert sorted(predictions) == sorted(test_ids) and all(isinstance(v, str) for v in predictions.values())
    test_metrics = json.loads((out / "test_metrics.json").read_text())
    assert test_metrics["total"] == len(test_ids) and summary["test"] == test_metrics
    model = RobertaForQuestionAnswering.from_pretrained(str(out / "hf"), kernels="torch").eval()
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForQuestionAnswering.from_pretrained(str(out / "hf")).eval()
    ids = torch.tensor([[0, 40, 50, 2, 2, 60, 70, 80, 2]])
    with torch.no_grad():
        a, b = model(ids), theirs(input_ids=ids)
    torch.testing.assert_close(a.start_logits, b.start_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.end_logits, b.end_logits, rtol=1e-4, atol=1e-5)


def test_squad_v2_run_picks_the_threshold_on_validation(qa_dir, tmp_path):
    out = tmp_path / "run"
    run(qa_dir, out, "v2", "squad_v2")
    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == "best_f1"
    assert {"HasAns_f1", "NoAns_f1", "best_f1_thresh", "best_exact_thresh"} <= set(best)
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 12
    # --task qa finds the unanswerable questions itself and takes SQuAD 2.0 rules.
    run(qa_dir, tmp_path / "auto", "v2", "qa", "--steps", "2")
    assert json.loads((tmp_path / "auto" / "best.json").read_text())["metric"] == "best_f1"


def test_qa_configuration_errors(qa_dir, tmp_path):
    with pytest.raises(ConfigError, match="--max-seq-len 64 leaves at most 36 context tokens .* --doc-stride 40"):
        run(qa_dir, tmp_path / "a", "v1", "qa", "--doc-stride", "40")
    with pytest.raises(ConfigError, match="--metric does not apply to --task squad: it reads fixed fields and is "
                                          "judged by f1"):
        run(qa_dir, tmp_path / "b", "v1", "squad", "--metric", "accuracy")
    with pytest.raises(ConfigError, match="--n-best must be"):
        run(qa_dir, tmp_path / "c", "v1", "qa", "--n-best", "0")


def test_qa_resume_matches_an_uninterrupted_run(qa_dir, tmp_path):
    extra = ("--steps", "6", "--eval-every", "3", "--dropout", "0.1")
    run(qa_dir, tmp_path / "full", "v2", "qa", *extra)
    first = run(qa_dir, tmp_path / "cut", "v2", "qa", *extra, "--stop-at-step", "4")
    assert first["step"] == 4 and first["hf"] is None
    run(qa_dir, tmp_path / "cut", "v2", "qa", *extra, "--resume")
    keys = ("step", "loss", "lr", "eval_f1", "eval_best_f1", "eval_best_f1_thresh")
    full, cut = (read_metrics(str(tmp_path / name / "metrics.jsonl")) for name in ("full", "cut"))
    assert [[r.get(k) for k in keys] for r in cut] == [[r.get(k) for k in keys] for r in full]
    assert (tmp_path / "cut" / "predictions.json").read_text() == (tmp_path / "full" / "predictions.json").read_text()
    a, b = (RobertaForQuestionAnswering.from_pretrained(str(tmp_path / name / "hf"), kernels="torch").state_dict()
            for name in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_bundled_qa_task_and_squad_defaults(qa_dir, tmp_path, monkeypatch):
    def settings(*argv):
        args = ft.build_parser().parse_args(["--model", str(qa_dir), "--precision", "fp32", "--output",
                                             str(tmp_path / "out"), *argv])
        return args, ft.resolve_settings(args)

    args, s = settings("--task", "qa", "--max-seq-len", "64", "--max-question-len", "24", "--doc-stride", "16")
    assert args.train is None and args.epochs == 10.0
    tokenizer, special = ft.load_checked_tokenizer(s)
    data, names = ft.load_data(args, s, tokenizer, special)
    assert names is None and s.task.version_2 is False and s.task.metric == "f1"
    examples = {name: part[2][0] for name, part in data.items()}
    assert [len(examples[n]) for n in ("train", "validation", "test")] == [2000, 500, 500]
    assert len(data["train"][0]) >= 2000 and data["train"][1].shape == (len(data["train"][0]), 2)  # windows
    args, s = settings("--task", "squad_v2")
    assert (args.train, args.validation, args.max_seq_len, s.task.metric) == ("hf:squad_v2", "hf:squad_v2", 64,
                                                                              "best_f1")
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)   # as without the package
    with pytest.raises(ConfigError, match=r"--train hf:squad_v2: reading Hugging Face datasets needs the `datasets`"):
        ft.load_data(args, s, tokenizer, special)
