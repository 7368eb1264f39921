"""The trainer under things going wrong: non-finite losses in every precision, bad input after argument parsing,
--overwrite, two runs on one output folder, damaged checkpoints and a full disk. Each failure must end with exit
1 (the run failed) or 2 (bad input) and one line on stderr naming the problem, never a traceback; nothing of an
earlier run may be lost before the new one can start.

Runs go through ``fastroberta.train.main`` in-process (the process group is reused, so each costs seconds) with
the tiny model of test_train.py; one case runs the console script to see exactly what a user sees."""
import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastroberta import RobertaForMaskedLM
from fastroberta import train as tr
from fastroberta.training.metrics import read_metrics
from fastroberta.training.checkpoints import find_checkpoint
from fastroberta.training.manifest import MANIFEST, verify_checkpoint, write_manifest
from fastroberta.training.nonfinite import NonFiniteGuard
from fastroberta.training.output import LOCK_FILE, OutputLock
from test_train import VOCAB, small  # noqa: F401  (shared session fixture)
from test_train_cli import child_env


def argv_for(small, out, *extra, config="nodropout"):  # noqa: F811
    return ["--config", small[config], "--cache-dir", small["cache"], "--vocab-size", str(VOCAB),
            "--seq-len", "32", "--micro-batch-size", "4", "--global-batch-size", "4", "--steps", "4",
            "--lr", "5e-3", "--log-every", "1", "--eval-every", "0", "--eval-batches", "1", "--no-progress",
            "--precision", "fp32", "--output", str(out), *extra]


def error_line(capsys):
    """The one error line of a failed run (and a check that no traceback was printed)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("fastroberta-train: error: "), lines
    return lines[0]


# --- non-finite losses --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_non_finite_losses_stop_the_run_in_every_precision(small, tmp_path, monkeypatch, capsys, precision):  # noqa: F811
    """The streak counts whatever DeepSpeed did with the step: bf16 skips such updates, fp32 applies them.
    A checkpoint saved before the trouble is named; nothing non-finite is saved or exported."""
    original = RobertaForMaskedLM.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out.loss is not None and self.training:
            calls["n"] += 1
            if calls["n"] > 2:  # steps 1-2 are clean and step 2 is checkpointed
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(RobertaForMaskedLM, "forward", poisoned)
    out = tmp_path / "out"
    code = tr.main(argv_for(small, out, "--steps", "50", "--max-nonfinite", "2", "--save-every", "2",
                            "--precision", precision))
    assert code == 1
    line = error_line(capsys)
    assert "non-finite" in line and "2 consecutive steps" in line and "up to step 4" in line, line
    assert "lr " in line and "global_step2" in line, line
    assert max(r["step"] for r in read_metrics(str(out / "metrics.jsonl"))) <= 4
    assert not (out / "hf").exists(), "non-finite weights must never be exported"
    assert (out / "checkpoints" / "latest").read_text() == "global_step2"
    assert verify_checkpoint(str(out / "checkpoints" / "global_step2")) is None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_diverging_learning_rate_stops_the_run(small, tmp_path, capsys, precision):  # noqa: F811
    """The issue's case: an absurd learning rate with clipping off must not end in exit 0 and a NaN export."""
    out = tmp_path / "out"
    code = tr.main(argv_for(small, out, "--steps", "30", "--lr", "1e4", "--clip-grad", "0", "--max-nonfinite",
                            "3", "--precision", precision, "--eval-every", "0"))
    assert code == 1
    line = error_line(capsys)
    assert "non-finite" in line, line
    assert not (out / "hf").exists()


def test_guard_counts_fp16_steps_stuck_at_the_minimum_loss_scale():
    guard = NonFiniteGuard(limit=3)
    # Ordinary overflow steps: skipped with a finite loss while the scale can still shrink.
    for scale in (65536.0, 32768.0, 16384.0, 8192.0):
        assert not guard.update(2.0, skipped=True, loss_scale=scale, min_loss_scale=1.0)
    assert guard.streak == 0
    assert not guard.update(2.0, skipped=True, loss_scale=1.0, min_loss_scale=1.0)
    assert not guard.update(2.0, skipped=True, loss_scale=1.0, min_loss_scale=1.0)
    assert guard.update(2.0, skipped=True, loss_scale=1.0, min_loss_scale=1.0)
    # A good step ends a streak; non-finite losses count whether skipped or not.
    guard = NonFiniteGuard(limit=2)
    assert not guard.update(float("nan"), skipped=True, loss_scale=1024.0, min_loss_scale=1.0)
    assert not guard.update(1.0)
    assert not guard.update(float("inf"))
    assert guard.update(float("nan"), skipped=False)
    assert not NonFiniteGuard(limit=0).update(float("nan")), "--max-nonfinite 0 never stops"


# --- one-line errors for bad input --------------------------------------------------------------------------------
def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", ["empty", "no_text", "bad_json", "no_brace", "hf_without_datasets", "seq_len"])
def test_bad_data_is_one_line(small, tmp_path, capsys, monkeypatch, case):  # noqa: F811
    if case == "empty":
        data, expect = _write(tmp_path / "empty.txt", "\n\n  \n"), "is empty"
    elif case == "no_text":
        data = _write(tmp_path / "c.jsonl", '{"text": "fine"}\n{"body": "no text"}\n')
        expect = 'c.jsonl, line 2: the record has no "text" field'
    elif case == "bad_json":
        data = _write(tmp_path / "c.jsonl", '{"text": "fine"}\n{"text": "fine"}\n{"text": broken\n')
        expect = "c.jsonl, line 3: invalid JSON (Expecting value at column 10)"
    elif case == "no_brace":
        data = _write(tmp_path / "c.jsonl", '{"text": "fine"}\n{"text": "fine"\n')
        expect = "c.jsonl, line 2: invalid JSON (Expecting ',' delimiter at the end of the line: a closing brace"
    elif case == "hf_without_datasets":
        monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
        data, expect = "hf:wikitext:wikitext-2-raw-v1", "needs the 'datasets' package"
    else:
        data, expect = None, "--seq-len 2 is too short"
    out = tmp_path / "out"
    extra = ["--cache-dir", str(tmp_path / "cache")]
    if data is not None:
        extra += ["--data", data]
    argv = argv_for(small, out, *extra)
    if case == "seq_len":
        argv += ["--seq-len", "2"]
    # Said before DeepSpeed starts (its start took most of a minute on a busy 2-core machine).
    monkeypatch.setattr(tr, "init_distributed", lambda *a: pytest.fail("DeepSpeed started before the data check"))
    assert tr.main(argv) == 2
    line = error_line(capsys)
    assert expect in line, line
    assert not out.exists(), "a run that never started leaves no output folder behind"


def test_output_that_is_a_file_or_not_writable(small, tmp_path, capsys, monkeypatch):  # noqa: F811
    target = tmp_path / "a_file"
    target.write_text("x")
    assert tr.main(argv_for(small, target)) == 2
    assert "is an existing file, not a folder" in error_line(capsys)
    assert tr.main(argv_for(small, target / "run")) == 2
    assert "is a file, not a folder" in error_line(capsys)
    # Root may write anywhere, so the permission itself is simulated.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    assert tr.main(argv_for(small, tmp_path / "run")) == 2
    assert "is not writable" in error_line(capsys)


def test_triton_from_the_environment_without_cuda_is_one_line(small, tmp_path, capsys, monkeypatch):  # noqa: F811
    if torch.cuda.is_available():
        pytest.skip("the check only applies without CUDA")
    monkeypatch.setenv("FASTROBERTA_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert tr.main(argv_for(small, tmp_path / "out")) == 2
    assert "FASTROBERTA_KERNELS=triton needs a CUDA GPU" in error_line(capsys)
    monkeypatch.setenv("FASTROBERTA_KERNELS", "cuda")
    assert tr.main(argv_for(small, tmp_path / "out")) == 2
    assert "FASTROBERTA_KERNELS='cuda' is not one of" in error_line(capsys)


def test_console_script_prints_one_line_and_no_traceback(tmp_path):
    """Through the real entry point (the launcher's processes print tracebacks with a [rank0]: prefix)."""
    exe = shutil.which("fastroberta-train")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = subprocess.run([exe, "--data", str(empty), "--output", str(tmp_path / "out"), "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=child_env(FASTROBERTA_CACHE=str(tmp_path / "cache")))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "[rank0]" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"fastroberta-train: error: the corpus {empty} is empty: it holds no non-blank text"], \
        proc.stderr


def test_debug_shows_the_traceback(small, tmp_path, capsys):  # noqa: F811
    empty = _write(tmp_path / "empty.txt", "")
    assert tr.main(argv_for(small, tmp_path / "out", "--data", empty, "--cache-dir", str(tmp_path / "c"),
                            "--debug")) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "fastroberta-train: error:" in err.splitlines()[-1]


# --- --overwrite and the output-folder lock -----------------------------------------------------------------------
def test_overwrite_keeps_the_old_run_until_the_new_one_can_start(small, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert tr.main(argv_for(small, out, "--steps", "2")) == 0
    before = sorted(os.listdir(out / "checkpoints"))
    empty = _write(tmp_path / "empty.txt", "")
    assert tr.main(argv_for(small, out, "--overwrite", "--data", empty, "--cache-dir", str(tmp_path / "c"))) == 2
    assert "is empty" in error_line(capsys)
    assert sorted(os.listdir(out / "checkpoints")) == before and (out / "hf").is_dir()
    assert (out / "checkpoints" / "latest").read_text() == "global_step2"
    # With good data the old run gives way: one run's records, one run's checkpoints.
    assert tr.main(argv_for(small, out, "--overwrite", "--steps", "3")) == 0
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1, 2, 3]
    assert sorted(n for n in os.listdir(out / "checkpoints") if n.startswith("global")) == ["global_step3"]


def test_a_second_run_on_a_locked_folder_refuses_at_once(small, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    holder = OutputLock(str(out)).acquire()
    try:
        assert tr.main(argv_for(small, out)) == 2
        line = error_line(capsys)
        assert f"{out} is in use by another run (pid {os.getpid()}" in line, line
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    finally:
        holder.release()
    assert tr.main(argv_for(small, out, "--steps", "1")) == 0, "the lock is free once its holder lets go"


def test_the_lock_dies_with_its_process(tmp_path):
    out = tmp_path / "out"
    code = ("import sys, time; from fastroberta.training.output import OutputLock; OutputLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(Exception, match="in use by another run"):
            OutputLock(str(out)).acquire()
    finally:
        child.kill()
        child.wait()
    OutputLock(str(out)).acquire().release()  # killed: the kernel released its lock
    assert (out / LOCK_FILE).exists()


# --- damaged checkpoints -----------------------------------------------------------------------------------------
@pytest.fixture()
def two_checkpoints(small, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert tr.main(argv_for(small, out, "--steps", "4", "--save-every", "2", "--stop-at-step", "4")) == 0
    ckpt = out / "checkpoints"
    assert sorted(n for n in os.listdir(ckpt) if n.startswith("global")) == ["global_step2", "global_step4"]
    return out, ckpt


def _model_file(folder):
    return folder / "mp_rank_00_model_states.pt"


def test_every_checkpoint_has_a_manifest_that_catches_damage(two_checkpoints):
    out, ckpt = two_checkpoints
    manifest = json.loads((ckpt / "global_step4" / MANIFEST).read_text())["files"]
    assert "mp_rank_00_model_states.pt" in manifest and "trainer_state_rank0.pt" in manifest
    assert all(len(e["sha256"]) == 64 and e["size"] > 0 for e in manifest.values())
    assert verify_checkpoint(str(ckpt / "global_step4")) is None
    model = _model_file(ckpt / "global_step4")
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    assert "mp_rank_00_model_states.pt has" in verify_checkpoint(str(ckpt / "global_step4"))
    model.write_bytes(os.urandom(len(data)))
    assert "does not match its checksum" in verify_checkpoint(str(ckpt / "global_step4"))


@pytest.mark.parametrize("damage", ["empty_latest", "truncated", "random_bytes"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(small, two_checkpoints, capsys, damage):  # noqa: F811
    out, ckpt = two_checkpoints
    if damage == "empty_latest":
        (ckpt / "latest").write_text("")
        expect_from = "global_step4"  # the pointer is lost, the checkpoints are fine
    else:
        model = _model_file(ckpt / "global_step4")
        size = model.stat().st_size
        model.write_bytes(model.read_bytes()[:size // 3] if damage == "truncated" else os.urandom(4096))
        expect_from = "global_step2"
    capsys.readouterr()
    assert tr.main(argv_for(small, out, "--steps", "4", "--save-every", "2", "--resume")) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "warning:" in line and "newest intact" in line]
    assert len(warning) == 1 and expect_from in warning[0], err
    assert f"resumed from {ckpt / expect_from}" in err
    assert (ckpt / "latest").read_text() == "global_step4"
    assert verify_checkpoint(str(ckpt / "global_step4")) is None, "the re-saved step 4 is intact again"
    assert (out / "hf").is_dir()


def test_an_explicit_damaged_checkpoint_names_the_intact_one(small, two_checkpoints, capsys):  # noqa: F811
    out, ckpt = two_checkpoints
    model = _model_file(ckpt / "global_step4")
    model.write_bytes(model.read_bytes()[:1000])
    assert tr.main(argv_for(small, out, "--resume", str(ckpt / "global_step4"))) == 1
    line = error_line(capsys)
    assert "global_step4 is damaged" in line and f"{ckpt / 'global_step2'}: pass it to --resume" in line, line


def test_non_finite_weights_in_a_checkpoint_are_an_error(small, two_checkpoints, capsys):  # noqa: F811
    out, ckpt = two_checkpoints
    path = _model_file(ckpt / "global_step4")
    state = torch.load(path, map_location="cpu", weights_only=False)
    name = next(iter(state["module"]))
    state["module"][name].fill_(float("nan"))
    torch.save(state, path)
    write_manifest(str(ckpt / "global_step4"))  # intact on disk, but poisoned
    assert tr.main(argv_for(small, out, "--steps", "6", "--resume")) == 1
    line = error_line(capsys)
    assert "global_step4 holds non-finite weights" in line and "global_step2" in line, line


def test_no_intact_checkpoint_at_all(two_checkpoints):
    _, ckpt = two_checkpoints
    for tag in ("global_step2", "global_step4"):
        (ckpt / tag / MANIFEST).unlink()
    with pytest.raises(tr.TrainingError, match="holds no intact checkpoint"):
        find_checkpoint(str(ckpt), explicit=False, warn=print)


# --- a full disk --------------------------------------------------------------------------------------------------
def test_a_full_disk_keeps_latest_and_says_so(small, tmp_path, monkeypatch, capsys):  # noqa: F811
    from deepspeed.runtime.engine import DeepSpeedEngine
    original = DeepSpeedEngine.save_checkpoint
    calls = []

    def disk_fills_up(self, save_dir, tag=None, **kwargs):
        calls.append(tag)
        if len(calls) == 2:
            with open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "wb") as f:
                f.write(b"\0" * 1000)
            # What torch's zip writer says when a write comes up short.
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
                               "file data/3: file write failed; unexpected pos 30893888 vs 30893780")
        return original(self, save_dir, tag=tag, **kwargs)

    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", disk_fills_up)
    out = tmp_path / "out"
    assert tr.main(argv_for(small, out, "--save-every", "2")) == 1
    line = error_line(capsys)
    assert "could not save the checkpoint of step 4: no space left on the device holding" in line, line
    assert "latest still names" in line and "global_step2" in line, line
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "global_step2"
    assert not any(n.endswith(".tmp") for n in os.listdir(ckpt)), "the partial checkpoint is removed"
    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", original)
    assert tr.main(argv_for(small, out, "--save-every", "2", "--resume")) == 0
    assert (ckpt / "latest").read_text() == "global_step4"


def test_leftover_partial_checkpoints_are_removed_before_a_save(small, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    (out / "checkpoints" / "global_step7.tmp").mkdir(parents=True)
    (out / "checkpoints" / "global_step7.tmp" / "junk.pt").write_bytes(b"x" * 100)
    assert tr.main(argv_for(small, out, "--steps", "2")) == 0
    assert sorted(os.listdir(out / "checkpoints")) == ["global_step2", "latest"]


def test_gzip_and_folder_inputs_still_train(small, tmp_path):  # noqa: F811
    """The error handling around the data pipeline lets every valid form through."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    from fastroberta.data.documents import default_corpus_path
    text = open(default_corpus_path()).read()
    with gzip.open(folder / "a.txt.gz", "wt") as f:
        f.write(text[:200000])
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in text[200000:400000].split("\n\n")))
    assert tr.main(argv_for(small, tmp_path / "out", "--data", str(folder), "--steps", "1",
                            "--cache-dir", str(tmp_path / "cache"), "--vocab-size", "512")) == 0
