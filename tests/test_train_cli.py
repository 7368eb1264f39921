"""The trainer as users launch it, in subprocesses: the no-argument run through the console script and SIGTERM
mid-run. Two processes through the ``deepspeed`` launcher against one process (ZeRO 3, parameters really
partitioned: losses, tokens, held-out loss and exported weights) are in tests/test_resume_anywhere.py, whose runs
do both at once."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastroberta import train as tr
from fastroberta import RobertaForMaskedLM
from fastroberta.training.metrics import read_metrics
from test_train import VOCAB, small  # noqa: F401  (shared session fixture)

# What a launcher or an earlier in-process run may have left in os.environ must not leak into a child.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "CROSS_RANK", "CROSS_SIZE")


def child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    env.update(extra)
    return env


def tr_model_from(path):
    return RobertaForMaskedLM.from_pretrained(str(path), kernels="torch")


def test_default_run_through_the_console_script(tmp_path):
    """`fastroberta-train` with only --steps shortening it: demo preset, bundled corpus, its own tokenizer; its
    stderr goes to a pipe, so progress comes as plain lines, and stdout stays empty."""
    exe = shutil.which("fastroberta-train")
    assert exe, "the console script fastroberta-train is not installed"
    proc = subprocess.run([exe, "--steps", "20", "--log-every", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=child_env(FASTROBERTA_CACHE=str(tmp_path / "cache")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs" / "fastroberta-demo"
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 21))
    assert records[-1]["loss"] < records[0]["loss"] - 0.5, "the loss must visibly fall"
    assert records[-1]["eval_loss"] < records[0]["loss"]
    assert {"step", "loss", "lr", "tokens_per_s", "mlm_accuracy", "grad_norm"} <= set(records[0])
    assert "train: step 20/20 (100%)" in proc.stderr and "tok_s=" in proc.stderr and "acc=" in proc.stderr
    assert "\r" not in proc.stderr, "no progress-bar redraws in a log"
    assert proc.stdout == "", proc.stdout  # DeepSpeed's "... built successfully" included
    assert "unigram baseline" in proc.stderr and "fill-mask on held-out lines" in proc.stderr
    assert records[-1]["unigram_baseline"] < records[-1]["uniform_baseline"]
    # The checkpoint and the HF export hold the same trained weights.
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "global_step20"
    module = torch.load(ckpt / "global_step20" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    exported = tr_model_from(out / "hf").state_dict()
    assert set(exported) == set(module)
    assert all(torch.equal(exported[k], module[k].float()) for k in module)
    # ... and transformers loads the export with its tokenizer.
    transformers = pytest.importorskip("transformers")
    model = transformers.RobertaForMaskedLM.from_pretrained(str(out / "hf"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out / "hf"))
    assert model.config.vocab_size == len(tokenizer) == 1024  # the demo preset's vocabulary
    enc = tokenizer(["To be, or not to <mask>, that is the question."], return_tensors="pt")
    assert enc["input_ids"][0, 0] == tokenizer.bos_token_id and tokenizer.mask_token_id in enc["input_ids"][0]
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(small, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = ["--config", small["dropout"], "--cache-dir", small["cache"], "--vocab-size", str(VOCAB),
            "--seq-len", "32", "--micro-batch-size", "4", "--global-batch-size", "8", "--steps", "100000",
            "--log-every", "1", "--save-every", "0", "--eval-every", "0", "--no-progress", "--output", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "fastroberta.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        deadline = time.time() + 300
        metrics = out / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by signal" in err
    tag = (out / "checkpoints" / "latest").read_text()
    stopped = int(tag.removeprefix("global_step"))
    assert stopped >= 3 and (out / "checkpoints" / tag / "mp_rank_00_model_states.pt").is_file()
    assert not (out / "hf").exists(), "an interrupted run exports nothing"
    # The checkpoint loads and training continues from the step after it.
    summary = tr.train(args[:-2] + ["--output", str(out), "--resume", "--steps", str(stopped + 2),
                                    "--eval-batches", "1"])
    assert summary["step"] == stopped + 2
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, stopped + 3))
    assert all(np.isfinite(r["loss"]) for r in records)
