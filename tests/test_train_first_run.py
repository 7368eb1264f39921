"""The first run a newcomer makes: the demo preset learns to use the context (not only token frequencies), the
run reports its loss against the held-out unigram baseline, and the exported model's fill-mask answers depend on
the sentence. One demo run (fp32, pinned: the outcome must not depend on the CPU) shared by the tests: the whole
default run, about 3 minutes on 2 quiet cores, as no shorter schedule of it was seen to leave the plateau."""
import os

import pytest

from fastroberta import run_report
from fastroberta import train as tr
from fastroberta.training.metrics import read_metrics

# The default run's length. The plateau where only frequencies and the kept-token copy are learnt (~0.45 nats
# below the unigram baseline) ends after about 3,000 steps; a 3,000-step schedule, whose rate decays sooner, was
# measured still on it (5.43 against a unigram baseline of 5.86), and 5,000 steps gave one answer to every
# fill-mask sentence in bf16.
STEPS = 8000


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_run")
    summary = tr.train(["--cache-dir", str(out / "cache"), "--steps", str(STEPS), "--precision", "fp32",
                        "--eval-every", "4000", "--save-every", "0", "--no-progress", "--output", str(out / "run")])
    return out / "run", summary, read_metrics(str(out / "run" / "metrics.jsonl"))


@pytest.mark.slow
def test_demo_run_beats_the_unigram_baseline_and_records_it(demo_run):
    out, summary, records = demo_run
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4000, 8000]
    final = evals[-1]
    assert all(r["unigram_baseline"] == final["unigram_baseline"] for r in evals)
    assert final["uniform_baseline"] > final["unigram_baseline"] > 0
    # Frequencies plus copying the kept tokens are worth ~0.45 nats here; beyond that is the context.
    assert final["eval_loss"] < final["unigram_baseline"] - 0.5, final
    assert summary["report"]["loss_png"] in (None, str(out / "loss.png"))


@pytest.mark.slow
def test_fill_mask_answers_depend_on_the_sentence(demo_run):
    out, summary, _ = demo_run
    shown = summary["report"]["fill_mask"]
    assert len(shown) == 3 and all(len(item["top"]) == 3 for item in shown)
    transformers = pytest.importorskip("transformers")
    fill = transformers.pipeline("fill-mask", model=str(out / "hf"), tokenizer=str(out / "hf"), device="cpu")
    top1 = [fill(item["text"], top_k=1)[0]["token_str"] for item in shown]
    assert len(set(top1)) >= 2, top1
    # The trainer's own samples are the same model's answers.
    assert [item["top"][0][0].strip() for item in shown] == [t.strip() for t in top1]


@pytest.mark.slow
def test_fine_tuning_the_demo_encoder_beats_the_same_model_from_scratch(demo_run, tmp_path):
    """fastroberta-finetune's bundled word-order task (a bag of words is at chance on it), at the command's
    defaults for it (lr 1e-3 for the 64-wide encoder, 10 epochs): the default run's encoder fine-tunes to a
    higher validation accuracy than the same-size model from scratch. Measured: 0.572 against 0.520 (fp32,
    seed 0); about 20 s each on 2 cores."""
    import json

    from fastroberta import finetune as ft
    out, _, _ = demo_run
    best = {}
    for name, extra in (("pretrained", []), ("scratch", ["--from-scratch"])):
        folder = tmp_path / name
        argv = ["--model", str(out), "--precision", "fp32", "--seed", "0", "--no-progress", "--output",
                str(folder), *extra]
        assert ft.main(argv) == 0
        run = json.loads((folder / "run.json").read_text())
        assert run["settings"]["lr"] == 1e-3 and run["args"]["epochs"] == 10, run  # the defaults the README's no-argument command relies on
        best[name] = json.loads((folder / "best.json").read_text())["accuracy"]
    assert best["pretrained"] > best["scratch"] + 0.01, best
