"""What several nodes need of each other, on one host: the output folder must be the same folder on every rank
(plain gloo process groups, no DeepSpeed); a lost node stops the other in bounded time (two one-process "nodes"
of the deepspeed launcher); the watchdog's heartbeats."""
import os
import socket

import pytest
import torch.multiprocessing as mp

from test_train import small  # noqa: F401  (shared session fixture: the prepared corpus, tiny configs)
from test_train_cli import child_env


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check(rank, world_size, port, trials, results):
    import torch.distributed as dist
    from fastroberta.training.distributed import check_shared_output
    from fastroberta.training.errors import TrainingError
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        for trial, folders in enumerate(trials):
            try:
                check_shared_output(folders[rank], rank, world_size)
                results[trial, rank] = "ok"
            except TrainingError as e:
                results[trial, rank] = str(e)
    finally:
        dist.destroy_process_group()


def run_checks(trials, world_size):
    """Each trial (one folder per rank) in one process group of ``world_size``; each rank's outcome per trial."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_check, args=(world_size, _free_port(), trials, results), nprocs=world_size, join=True)
        return [[results[t, r] for r in range(world_size)] for t in range(len(trials))]


def test_output_folder_must_be_shared(tmp_path):
    shared, local = tmp_path / "shared", tmp_path / "node1-local"
    shared.mkdir(), local.mkdir()
    good, results = run_checks([[str(shared)] * 3, [str(shared), str(local), str(shared)]], 3)
    assert good == ["ok"] * 3
    assert os.listdir(shared) == []                      # the token is gone again
    host = socket.gethostname()
    for message in results:                              # every rank refuses, with the same one line
        assert message == results[0] and "\n" not in message
    assert f"rank 1 ({host})" in results[0] and "rank 2" not in results[0]
    assert f"output folder {shared} is not shared" in results[0]
    assert os.listdir(local) == []


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _children(pid):
    """Every descendant process id of ``pid`` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except OSError:
                pass
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")
    except OSError:
        return ""


@pytest.mark.slow
def test_lost_node_stops_the_other_in_bounded_time(small, tmp_path):  # noqa: F811
    """Two one-process "nodes" (tiny model, fp32), node 1's training process SIGKILLed once a checkpoint exists:
    node 0 exits non-zero within --dist-timeout with one line naming rank 1 and the checkpoint, and a one-process
    --resume (the lock released) continues from it."""
    import signal
    import subprocess
    import sys
    import time
    cache, config = small["cache"], small["nodropout"]
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out, timeout = tmp_path / "run", 30  # the watchdog: a peer silent for 15 s is lost (a busy CI host starts slowly)
    args = ["--config", config, "--cache-dir", cache, "--vocab-size", "512", "--seq-len", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--steps", "100000", "--eval-every", "0",
            "--eval-batches", "1", "--samples", "0", "--no-progress", "--precision", "fp32", "--save-every", "2",
            "--output", str(out)]
    env = child_env(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    port = str(_free_port())
    logs = [tmp_path / f"node{n}.log" for n in (0, 1)]  # files, not pipes: nobody reads a pipe until the end

    def tails():
        return "\n".join(f"--- node {n}:\n" + log.read_text()[-2500:] for n, log in enumerate(logs))

    nodes = []
    for n in (0, 1):
        with open(logs[n], "w") as log:
            nodes.append(subprocess.Popen(
                [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hosts), "--no_ssh",
                 "--node_rank", str(n), "--master_addr", "127.0.0.1", "--master_port", port,
                 "--module", "fastroberta.train", *args, "--dist-timeout", str(timeout)],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True))
    try:
        deadline = time.time() + 180  # start-up of two one-process nodes: no op to build (training/host.py)
        # any checkpoint: at tens of steps a second, step 2's is gone (rotated out) before a poll may see it
        while not (out / "checkpoints" / "latest").exists():
            assert time.time() < deadline and all(n.poll() is None for n in nodes), "no checkpoint: " + tails()
            time.sleep(0.5)
        training = [p for p in _children(nodes[1].pid) if "fastroberta.train" in _cmdline(p)
                    and "deepspeed.launcher" not in _cmdline(p)]
        assert training, "node 1's training process not found"
        for pid in training:
            os.kill(pid, signal.SIGKILL)
        killed = time.time()
        nodes[0].wait(timeout=timeout + 60)
        elapsed = time.time() - killed
        log0 = logs[0].read_text()
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
                n.wait()
    assert nodes[0].returncode != 0
    assert elapsed < timeout + 10, elapsed  # + the launcher's own shutdown
    errors = [line for line in log0.splitlines() if "fastroberta-train: error:" in line]
    assert len(errors) == 1, log0[-3000:]
    last_good = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()  # step 2 or a few later
    assert "rank 1 (" in errors[0] and f"the last good checkpoint is {last_good}" in errors[0], errors[0]
    assert "--resume" in errors[0]
    assert "Traceback" not in log0, log0[-3000:]

    # The lock is free and the run continues on one process from the last good checkpoint.
    step = int(last_good.name.removeprefix("global_step"))
    resumed = subprocess.run([sys.executable, "-m", "fastroberta.train", *args, "--resume", "--stop-at-step",
                              str(step + 2)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {last_good} at step {step}" in resumed.stdout + resumed.stderr
    assert (out / "checkpoints" / "latest").read_text() == f"global_step{step + 2}"


def test_watchdog_names_only_silent_ranks(tmp_path):
    import time
    from fastroberta.training.watchdog import ALIVE_DIR, Watchdog
    alive = tmp_path / ALIVE_DIR
    alive.mkdir()
    (alive / "rank1").write_text("node2")                # left by a killed earlier run: old, but not yet stale
    os.utime(alive / "rank1", (0, 0))
    (alive / "rank2").write_text("node3 done")           # ended normally, long ago
    os.utime(alive / "rank2", (0, 0))
    dog = Watchdog(str(tmp_path), 0, 4, timeout=0.8, on_lost=None)
    dog.host, dog.interval = "node1", 60                 # no beats from the thread during the test
    dog.start()
    assert (alive / "rank0").read_text() == "node1"
    assert dog.lost_ranks() == []                        # rank 3 has not started yet: it gets timeout / 2
    (alive / "rank3").write_text("node4")
    time.sleep(0.5)
    os.utime(alive / "rank3")                            # rank 3 beats, rank 1 stays silent
    assert dog.lost_ranks() == ["rank 1 (node2)"]
    dog.stop()
    assert (alive / "rank0").read_text() == "node1 done"
