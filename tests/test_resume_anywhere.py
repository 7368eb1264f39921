"""Resume on another number of processes (DeepSpeed Universal Checkpointing), the launcher's two-process runs and
two one-process "nodes" on one host, on CPU with gloo: every run is a real `python -m fastroberta.train`,
`deepspeed --num_gpus 2` or `deepspeed --hostfile hosts --no_ssh --node_rank N` process.

A tiny model (hidden 32, 2 layers, seq 32), fp32, dropout 0, global batch 8, 6 steps: the losses of a run
checkpointed on one world size and resumed on another must equal the uninterrupted run's at every step (1e-4
relative). One uninterrupted single-process run is the reference of every ZeRO stage: in fp32 the stages agree on one
process to float rounding (tests/test_train.py, <= 5e-7), far below that tolerance. Each stage is resumed both
ways, the second from the first resumed run's own checkpoint after one step (a start-up of DeepSpeed costs more than
the steps): ZeRO 1 from 1 process on 2 "nodes" and back on 1, ZeRO 2 and ZeRO 3 from 2 processes on 1 and back on 2
"nodes"."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastroberta.training.metrics import read_metrics
from test_train import VOCAB, exported_state, small  # noqa: F401  (shared session fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, HALF = 6, 3
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "CROSS_RANK", "CROSS_SIZE")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(small, out, processes, zero, *extra, nodes=False):  # noqa: F811
    """One run of fastroberta.train on ``processes`` CPU processes (``nodes``: as that many one-process "nodes",
    one launcher each, the way several machines start); returns its stdout+stderr (asserts exit 0)."""
    args = ["--config", small["nodropout"], "--cache-dir", small["cache"], "--vocab-size", str(VOCAB), "--seq-len",
            "32", "--micro-batch-size", "2", "--global-batch-size", "8", "--steps", str(STEPS), "--lr", "5e-3",
            "--log-every", "1", "--eval-every", "0", "--eval-batches", "1", "--samples", "0", "--no-progress",
            "--precision", "fp32", "--zero-stage", str(zero), "--output", str(out), *extra]
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(PYTHONPATH=ROOT, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    if nodes:
        hosts = os.path.join(os.path.dirname(str(out)), "hosts")
        with open(hosts, "w") as f:
            f.write("localhost slots=1\n127.0.0.1 slots=1\n")
        port = str(free_port())
        # Each node's output goes to a file: read one pipe after the other, and the other node, blocked on its
        # full pipe, would stall the collective both wait in.
        files, procs = [os.path.join(os.path.dirname(str(out)), f"node{n}.log") for n in range(2)], []
        for n in range(2):
            with open(files[n], "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", hosts, "--no_ssh",
                     "--node_rank", str(n), "--master_addr", "127.0.0.1", "--master_port", port,
                     "--module", "fastroberta.train", *args], env=env, cwd=ROOT, stdout=log,
                    stderr=subprocess.STDOUT, text=True))
        try:
            for p in procs:
                p.wait(timeout=600)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        logs = [open(f).read() for f in files]
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


def records(out):
    return {r["step"]: r for r in read_metrics(os.path.join(str(out), "metrics.jsonl")) if "loss" in r}


def assert_losses_match(got, want, steps):
    a, b = np.array([got[s]["loss"] for s in steps]), np.array([want[s]["loss"] for s in steps])
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=0)


@pytest.fixture(scope="module")
def reference(small, tmp_path_factory):  # noqa: F811
    """The uninterrupted run: one process, ZeRO 1, checkpointed halfway (the ZeRO-1 resume on 2 nodes starts there)."""
    out = tmp_path_factory.mktemp("anywhere") / "reference"
    train(small, out, 1, 1, "--save-every", str(HALF))
    got = records(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    return out, got


def resume_copy(src_ckpt, dst):
    """A new run folder holding only checkpoint ``src_ckpt`` (as a checkpoints folder would hold it)."""
    os.makedirs(dst / "checkpoints")
    shutil.copytree(src_ckpt, dst / "checkpoints" / os.path.basename(src_ckpt))
    return str(dst / "checkpoints" / os.path.basename(src_ckpt))


@pytest.mark.slow
def test_zero1_one_process_resumes_on_two_nodes_then_on_one(small, reference, tmp_path):  # noqa: F811
    one, want = reference
    resumed = tmp_path / "nodes"
    log = train(small, resumed, 2, 1, "--resume", resume_copy(one / "checkpoints" / f"global_step{HALF}", resumed),
                "--save-every", "1", nodes=True)
    assert "of 1 process on 2: converted once into" in log
    assert_losses_match(records(resumed), want, range(HALF + 1, STEPS + 1))

    # The two-node run's checkpoint after its first step -> 1 process.
    single = tmp_path / "single"
    log = train(small, single, 1, 1, "--resume", resume_copy(resumed / "checkpoints" / f"global_step{HALF + 1}", single))
    assert "of 2 processes on 1: converted once into" in log
    assert_losses_match(records(single), want, range(HALF + 2, STEPS + 1))


@pytest.mark.slow
def test_zero2_two_processes_resume_on_one_then_on_two_nodes(small, reference, tmp_path):  # noqa: F811
    _, want = reference
    # 2 processes, stopped halfway: the same global batches, so the same losses as one process.
    two = tmp_path / "two"
    train(small, two, 2, 2, "--stop-at-step", str(HALF), "--save-every", str(HALF))
    assert_losses_match(records(two), want, range(1, HALF + 1))
    with open(two / "run.json") as f:
        assert json.load(f)["settings"]["world_size"] == 2

    # 2 -> 1: converted once into the run folder, verified, then the rest of the run equals the reference.
    log = train(small, two, 1, 2, "--resume", "--save-every", "1", "--keep-last", "0")  # keep what was converted
    converted = two / "checkpoints" / "universal" / f"global_step{HALF}"
    assert (converted / "manifest.json").is_file()
    assert f"of 2 processes on 1: converted once into {converted}" in log
    assert "will not match" not in log                     # the world size is not a setting that changes results
    assert_losses_match(records(two), want, range(HALF + 1, STEPS + 1))

    # That one-process checkpoint after its first step -> 2 "nodes".
    nodes = tmp_path / "nodes"
    log = train(small, nodes, 2, 2, "--resume", resume_copy(two / "checkpoints" / f"global_step{HALF + 1}", nodes),
                nodes=True)
    assert "of 1 process on 2: converted once into" in log
    assert_losses_match(records(nodes), want, range(HALF + 2, STEPS + 1))


@pytest.mark.slow
def test_zero3_two_processes_resume_on_one_then_on_two_nodes(small, reference, tmp_path):  # noqa: F811
    """ZeRO 3 both ways: its universal load is DeepSpeed's own code path (repaired in
    checkpoints.repair_zero3_universal_load), and a checkpoint written after such a load is an ordinary one."""
    one, want = reference
    two = tmp_path / "two"
    log = train(small, two, 2, 3, "--stop-at-step", str(HALF), "--save-every", str(HALF))
    assert "world 2, global batch 8 = 2 x 2 accumulation x 2" in log
    got = records(two)
    assert_losses_match(got, want, range(1, HALF + 1))
    assert [got[s]["tokens_seen"] for s in range(1, HALF + 1)] == [want[s]["tokens_seen"] for s in range(1, HALF + 1)]

    # 2 -> 1, saving after its first step on one process.
    train(small, two, 1, 3, "--resume", "--save-every", "1")
    assert_losses_match(records(two), want, range(HALF + 1, STEPS + 1))

    # That one-process checkpoint -> 2 "nodes": the run ends with the reference's weights and held-out loss.
    nodes = tmp_path / "nodes"
    train(small, nodes, 2, 3, "--resume", resume_copy(two / "checkpoints" / f"global_step{HALF + 1}", nodes),
          nodes=True)
    got = records(nodes)
    assert_losses_match(got, want, range(HALF + 2, STEPS + 1))
    assert got[STEPS]["eval_loss"] == pytest.approx(want[STEPS]["eval_loss"], rel=1e-4)
    a, b = exported_state(nodes), exported_state(one)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_zero3_universal_load_gets_its_own_step_and_decay_per_group():
    """What DeepSpeed 0.19.8's ZeRO-3 universal load leaves behind (one ``step`` tensor shared by every group's
    state, the first group's weight decay on every group), repaired: torch's Adam then counts one step per step."""
    from fastroberta.training.checkpoints import repair_zero3_universal_load
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    opt = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.01},
                             {"params": params[1:], "weight_decay": 0.0}], lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    shared = torch.tensor(3.0)
    for p in params:
        opt.state[p]["step"] = shared
    for group in opt.param_groups:
        group["weight_decay"] = 0.01
    repair_zero3_universal_load(opt, [0.01, 0.0])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    opt.step()
    assert [float(opt.state[p]["step"]) for p in params] == [4.0, 4.0]
