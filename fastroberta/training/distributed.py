"""The process group: rank and world size from the launcher, or a group of one for a plain process; DeepSpeed's
CPU accelerator with gloo when there is no GPU."""
import datetime
import os
import socket

import torch


def world():
    """(rank, world size) from the launcher's environment; a plain process is rank 0 of 1."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(on_cuda, local_rank, timeout=None):
    """Start (or join) the process group, whose collectives wait at most ``timeout`` seconds (None: DeepSpeed's
    default); returns (device, CPU thread choice or None). A plain process without the launcher becomes a group
    of one."""
    from fastroberta.training import host
    threads = None
    if not on_cuda:
        # DeepSpeed picks its accelerator at import; with no GPU make the CPU choice explicit.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Several ranks on one CPU host, or other busy processes, would each get one thread per core; take
        # this process's share of the cores instead (unless OMP_NUM_THREADS says).
        local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        threads = host.set_cpu_threads(local_size)
    import deepspeed
    import torch.distributed as dist
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    device = torch.device("cuda", local_rank) if on_cuda else torch.device("cpu")
    if on_cuda:
        # Before NCCL starts, so that each rank's communicator binds to its own GPU.
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        with host.quiet_deepspeed_stdout():  # its CPU comm op announces itself on stdout
            kw = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
            deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo", verbose=False, **kw)
    return device, threads


def all_ranks_true(flag, device):
    import torch.distributed as dist
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.item() == 0.0


SHARED_TOKEN = ".shared-check"


def check_shared_output(folder, rank, world_size):
    """Refuse (TrainingError, one line) unless every rank sees the same ``folder``: rank 0 writes a random token
    there and the others read it back. Run before anything else is written there, so that a node whose output
    folder is a local disk never writes a checkpoint no other node can read."""
    if world_size == 1:
        return
    import torch.distributed as dist
    from fastroberta.training.errors import TrainingError
    path = os.path.join(folder, SHARED_TOKEN)
    token = [os.urandom(16).hex(), folder] if rank == 0 else [None, None]
    if rank == 0:
        with open(path, "w") as f:
            f.write(token[0])
    dist.broadcast_object_list(token, src=0)
    folder = token[1]  # the messages name rank 0's path
    try:
        with open(path) as f:
            seen = f.read() == token[0]
    except OSError:
        seen = False
    views = [None] * world_size
    dist.all_gather_object(views, (seen, socket.gethostname()))
    dist.barrier()  # everyone has read the token before rank 0 removes it
    if rank == 0:
        os.remove(path)
    blind = [f"rank {r} ({host})" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise TrainingError(f"the output folder {folder} is not shared: {', '.join(blind)} cannot see what rank 0 "
                            f"({views[0][1]}) writes there; put it on a filesystem every node mounts at the same path")
