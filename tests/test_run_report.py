"""What a finished run shows (fastroberta.run_report), the progress display off a terminal, the CPU thread
choice on a shared machine and DeepSpeed's stdout line (fastroberta.training.progress, fastroberta.training.host)."""
import io
import math
import os

import numpy as np
import pytest

from fastroberta import run_report
from fastroberta.training import host
from fastroberta.data import prepare_dataset
from fastroberta.training.progress import PlainProgress, progress_bar


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_dataset(cache_dir=str(tmp_path_factory.mktemp("report_cache")), vocab_size=512,
                           show_progress=False)


def test_unigram_baseline_is_the_held_out_cross_entropy_of_training_frequencies(prepared):
    base = run_report.baselines(prepared)
    specials = set(prepared.special_ids.values())
    train = np.bincount(np.asarray(prepared.tokens("train")), minlength=prepared.vocab_size).astype(float)
    val = np.bincount(np.asarray(prepared.tokens("val")), minlength=prepared.vocab_size).astype(float)
    keep = np.array([i not in specials for i in range(prepared.vocab_size)])
    p = (train[keep] + 1) / (train[keep].sum() + keep.sum())
    expected = -(val[keep] * np.log(p)).sum() / val[keep].sum()
    assert base["unigram"] == pytest.approx(expected, rel=1e-9)
    assert base["uniform"] == pytest.approx(math.log(prepared.vocab_size))
    # Frequencies say something: the unigram guess beats the uniform one by a wide margin on this corpus.
    assert base["unigram"] < base["uniform"] - 0.5
    # The training counts are cached beside the shards, and the cache is what a second call reads.
    cached = os.path.join(prepared.path, run_report.COUNTS_FILE)
    assert os.path.isfile(cached)
    np.testing.assert_array_equal(np.load(cached), train.astype(np.int64))


def test_summary_line_reads_as_the_issue_asks():
    line = run_report.summary_line({"eval_loss": 5.1234, "eval_accuracy": 0.2109}, {"unigram": 6.3, "uniform": 9.01})
    assert line == "eval loss 5.12 (unigram baseline 6.30, uniform 9.01), accuracy 0.211"


def test_held_out_sentences_mask_one_whole_word(prepared):
    sentences = run_report.heldout_sentences(prepared, 3)
    assert len(sentences) == 3 and run_report.heldout_sentences(prepared, 3) == sentences  # deterministic
    val_text = prepared.tokenizer.decode(np.asarray(prepared.tokens("val")).tolist())
    mask_id = prepared.tokenizer.token_to_id("<mask>")
    for before, word, after in sentences:
        assert (before + word + after) in val_text  # a held-out line, not a training one
        assert before and word.isalpha()
        ids = prepared.tokenizer.encode(before + "<mask>" + after).ids
        assert ids.count(mask_id) == 1
        # The word is one token, so a single <mask> can be filled with it.
        assert len(prepared.tokenizer.encode(" " + word, add_special_tokens=False).ids) == 1
    assert len({w for _, w, _ in sentences}) == 3


def test_plot_is_optional_and_drawn_when_matplotlib_exists(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 7.0}\n{"step": 2, "loss": 6.0, "eval_loss": 6.2}\n')
    png = run_report.plot_losses(str(metrics), str(tmp_path / "loss.png"), unigram=6.5)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert png is None and not (tmp_path / "loss.png").exists()
    else:
        assert png and (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plain_progress_prints_lines_not_carriage_returns():
    out = io.StringIO()
    bar = progress_bar(total=50, file=out)  # a StringIO is no terminal
    assert isinstance(bar, PlainProgress)
    for step in range(50):
        bar.update(1)
        bar.set_postfix(loss=f"{7 - step / 10:.3f}", tok_s="900", refresh=False)
    bar.write("step 50: eval loss 5.0")
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # The first and the last step (the interval is 15 s, so nothing in between), then the message.
    assert lines[0].startswith("train: step 1/50 (2%) loss=7.000 tok_s=900")
    assert lines[1].startswith("train: step 50/50 (100%) loss=2.100") and len(lines) == 3
    quiet = io.StringIO()
    bar = progress_bar(total=5, file=quiet, disable=True)
    bar.update(5)
    bar.set_postfix(loss="1", refresh=False)
    bar.write("still said")
    assert quiet.getvalue() == "still said\n"


@pytest.mark.parametrize("cores, local_size, busy, expected", [
    (2, 1, 0, 2),    # alone: every core
    (2, 1, 1, 1),    # another busy process: the free core
    (2, 1, 5, 1),    # a crowded machine: still one thread
    (2, 2, 0, 1),    # two launcher ranks on two cores
    (16, 4, 0, 4),
    (16, 1, 3, 13),
    (16, 2, 12, 4),
])
def test_cpu_threads_take_this_process_share(cores, local_size, busy, expected):
    assert host.cpu_threads(cores, local_size, busy) == expected


def test_omp_num_threads_wins(monkeypatch):
    import torch
    before = torch.get_num_threads()
    assert host.set_cpu_threads(1, environ={"OMP_NUM_THREADS": "3"}) is None
    assert torch.get_num_threads() == before


def test_deepspeed_build_line_is_dropped_and_other_output_moved_to_stderr(capsys):
    with host.quiet_deepspeed_stdout():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("something else")
    out, err = capsys.readouterr()
    assert out == "" and err == "something else\n"


def test_plot_command_draws_a_run_folder_or_says_what_is_missing(tmp_path, capsys, monkeypatch):
    from fastroberta import plot
    run = tmp_path / "run"
    run.mkdir()
    assert plot.main([str(run)]) == 2
    assert "holds no metrics.jsonl" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 7.0, "unigram_baseline": 6.5}\n'
                                       '{"step": 2, "loss": 6.0, "eval_loss": 6.2}\n')
    said = []
    monkeypatch.setattr(plot, "matplotlib_missing", lambda: True)
    assert plot.draw_run(str(run), said.append) is None
    assert said == [f"loss.png not drawn: matplotlib is not installed (pip install matplotlib, then python -m "
                    f"fastroberta.plot {run})"]
    assert plot.main([str(run)]) == 2 and "needs matplotlib" in capsys.readouterr().err
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert plot.main([str(run)]) == 0
    assert capsys.readouterr().out == f"loss curve: {run / 'loss.png'}\n"
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("threads, cores, local_size, busy, expected", [
    (1, 2, 1, 5, "1 of 2 cores (all 2 busy with other processes, about 5 running)"),
    (3, 4, 1, 1, "3 of 4 cores (1 of them busy with other processes)"),
    (1, 2, 2, 0, "1 of 2 cores (2 local processes share them)"),
])
def test_cpu_threads_line_reads_plainly(threads, cores, local_size, busy, expected):
    assert host.threads_reason(threads, cores, local_size, busy) == expected + "; set OMP_NUM_THREADS to choose"
