"""Resume on another number of processes (DeepSpeed Universal Checkpointing), the launcher's two-process runs and
two one-process "nodes" on one host, on CPU with gloo: every run is a real `python -m fastroberta.train`,
`deepspeed --num_gpus 2` or `deepspeed --hostfile hosts --no_ssh --node_rank N` process.

A tiny model (hidden 32, 2 layers, seq 32), fp32, dropout 0, global batch 8, 6 steps: the losses of a run
checkpointed on one world size and resumed on another must equal the uninterrupted run's at every step."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from fastroberta import RobertaConfig
from fastroberta.data import prepare_dataset
from fastroberta.training.metrics import read_metrics

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, STEPS, HALF = 512, 6, 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("anywhere")
    cache = str(root / "cache")
    prepared = prepare_dataset(cache_dir=cache, vocab_size=VOCAB, show_progress=False)
    ids = prepared.special_ids
    config = str(root / "tiny.json")
    RobertaConfig(vocab_size=prepared.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"]).save_json(config)
    return {"cache": cache, "config": config}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(tiny, out, processes, zero, *extra, nodes=False):
    """One run of fastroberta.train on ``processes`` CPU processes (``nodes``: as that many one-process "nodes",
    one launcher each, the way several machines start); returns its stdout+stderr (asserts exit 0)."""
    args = ["--config", tiny["config"], "--cache-dir", tiny["cache"], "--vocab-size", str(VOCAB), "--seq-len", "32",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--steps", str(STEPS), "--lr", "5e-3",
            "--log-every", "1", "--eval-every", "0", "--eval-batches", "1", "--samples", "0", "--no-progress",
            "--precision", "fp32", "--zero-stage", str(zero), "--output", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": ROOT, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    if nodes:
        hosts = os.path.join(str(out), "..", "hosts")
        with open(hosts, "w") as f:
            f.write("localhost slots=1\n127.0.0.1 slots=1\n")
        port = str(free_port())
        procs = [subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", hosts, "--no_ssh",
                                   "--node_rank", str(n), "--master_addr", "127.0.0.1", "--master_port", port,
                                   "--module", "fastroberta.train", *args], env=env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in range(2)]
        logs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
        return "".join(logs)
    if processes == 1:
        cmd = [sys.executable, "-m", "fastroberta.train", *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(processes), "--master_port",
               str(free_port()), "--module", "fastroberta.train", *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(str(out), "metrics.jsonl")) if "loss" in r}


def assert_losses_match(got, want, steps):
    a, b = np.array([got[s] for s in steps]), np.array([want[s] for s in steps])
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=0)


@pytest.mark.parametrize("zero", [2, 1, pytest.param(3, marks=pytest.mark.xfail(strict=True, reason=(
    "ZeRO 3: the resumed run matches the uninterrupted one at its first step (the weights) but drifts by ~2e-4 "
    "relative from the second (optimizer state after DeepSpeed 0.19.8's ZeRO-3 universal load); not yet found")))])
def test_resume_on_another_number_of_processes(tiny, tmp_path, zero):
    # Uninterrupted on one process, checkpointing halfway (the 1 -> 2 resume starts there).
    one = tmp_path / "one"
    train(tiny, one, 1, zero, "--save-every", str(HALF))
    reference = losses(one)
    assert sorted(reference) == list(range(1, STEPS + 1))

    # 2 processes, stopped halfway: the same global batches, so the same losses as one process.
    two = tmp_path / "two"
    train(tiny, two, 2, zero, "--stop-at-step", str(HALF), "--save-every", str(HALF))
    assert_losses_match(losses(two), reference, range(1, HALF + 1))
    with open(two / "run.json") as f:
        assert json.load(f)["settings"]["world_size"] == 2

    # 2 -> 1: converted once into the run folder, verified, then the rest of the run equals the reference.
    log = train(tiny, two, 1, zero, "--resume")
    converted = two / "checkpoints" / "universal" / f"global_step{HALF}"
    assert (converted / "manifest.json").is_file()
    assert f"of 2 processes on 1: converted once into {converted}" in log
    assert "will not match" not in log                     # the world size is not a setting that changes results
    assert_losses_match(losses(two), reference, range(HALF + 1, STEPS + 1))

    # 1 -> 2 (as two one-process "nodes"), from the reference run's halfway checkpoint.
    resumed = tmp_path / "resumed"
    os.makedirs(resumed)
    subprocess.run(["cp", "-r", str(one / "checkpoints"), str(resumed)], check=True)
    train(tiny, resumed, 2, zero, "--resume", str(resumed / "checkpoints" / f"global_step{HALF}"), nodes=True)
    assert_losses_match(losses(resumed), reference, range(HALF + 1, STEPS + 1))
