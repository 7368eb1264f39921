"""What several nodes need of each other, checked with plain gloo process groups on one host (no DeepSpeed): the
output folder must be the same folder on every rank."""
import os
import socket

import pytest
import torch.multiprocessing as mp


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
