"""The first seconds of a run: a line before DeepSpeed starts (its import and process group take seconds, a first
multi-process CPU start a minute more), no shared-memory comm op where DeepSpeed would not use it (one process,
ranks on several hosts), a build lock left by an interrupted build removed on the next start, and a run clock that
includes start-up."""
import os
import subprocess
import time

import pytest
import torch

from fastroberta import train as tr
from fastroberta.training import host
from test_train import VOCAB, small  # noqa: F401  (shared session fixture)


class Started(Exception):
    pass


def test_first_lines_come_before_deepspeed_starts(small, tmp_path, capsys, monkeypatch):  # noqa: F811
    seen = {}

    def init_distributed(*args):
        seen["err"] = capsys.readouterr().err
        raise Started

    monkeypatch.setattr(tr, "init_distributed", init_distributed)
    with pytest.raises(Started):
        tr.train(["--config", small["nodropout"], "--cache-dir", small["cache"], "--vocab-size", str(VOCAB),
                  "--seq-len", "32", "--precision", "fp32", "--no-progress", "--output", str(tmp_path / "out")])
    lines = seen["err"].splitlines()
    assert lines[0] == "preparing data: the bundled corpus (tokenizer and token shards, cached for later runs)"
    assert lines[1].startswith("data ready: vocab ")
    if not torch.cuda.is_available():
        assert lines[-1] == "starting DeepSpeed (CPU, gloo, world 1): one process: no communication op to build"
        import deepspeed.ops
        assert deepspeed.ops.__compatible_ops__[host.SHM_OP] is False, "a single process builds no shm op"


def test_a_stale_build_lock_is_removed_and_a_live_one_kept(tmp_path):
    build = tmp_path / "deepspeed_shm_comm"
    build.mkdir()
    lock = build / "lock"
    lock.write_text("")
    assert host.clear_stale_build_lock(str(build)) is None, "a fresh lock may belong to a build just starting"
    old = time.time() - 2 * host.STALE_LOCK_AGE_S
    os.utime(lock, (old, old))
    builder = subprocess.Popen(["sleep", "30"], cwd=build)  # a build runs ninja in its folder
    try:
        time.sleep(0.2)
        assert host.clear_stale_build_lock(str(build)) is None and lock.exists()
    finally:
        builder.kill()
        builder.wait()
    assert host.clear_stale_build_lock(str(build)) == str(lock) and not lock.exists()
    assert host.clear_stale_build_lock(str(build)) is None  # nothing left to remove


def test_several_cpu_processes_build_in_this_environments_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")  # recorded, so that the test leaves the variable as it was
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    note = host.cpu_start_note(2, local=2)
    folder = os.environ["TORCH_EXTENSIONS_DIR"]
    assert os.path.basename(folder).startswith("fastroberta-") and folder == host.extensions_dir()
    assert "shared-memory communication op" in note
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # the user's choice wins
    stale = tmp_path / host.SHM_OP / "lock"
    stale.parent.mkdir()
    stale.write_text("")
    os.utime(stale, (0, 0))
    assert f"removed the lock an interrupted build left, {stale}" in host.cpu_start_note(2, local=2)


def test_ranks_on_several_hosts_build_no_shm_op(monkeypatch):
    """DeepSpeed's shared-memory op serves only when every rank is on one host (LOCAL_SIZE == world size): two
    nodes, or torchrun (no LOCAL_SIZE), would build it for nothing, a minute or more of start-up."""
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert host.cpu_start_note(2, local=1) == "ranks on several hosts: no shared-memory communication op to build"
    assert "DeepSpeed uses no shared-memory op: nothing to build" in host.cpu_start_note(2, local=0)
    assert "TORCH_EXTENSIONS_DIR" not in os.environ
    assert host.shm_op_used(4, 4) and not host.shm_op_used(4, 2) and not host.shm_op_used(1, 1)
    import deepspeed.ops
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, host.SHM_OP, True)
    host.skip_unused_shm_op(2, local=2)
    assert deepspeed.ops.__compatible_ops__[host.SHM_OP] is True
    host.skip_unused_shm_op(2, local=1)
    assert deepspeed.ops.__compatible_ops__[host.SHM_OP] is False
