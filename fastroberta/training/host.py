"""The machine a CPU job runs on: how many threads each process should use when the cores are shared, and
DeepSpeed's stray stdout line at start-up.

Threads: torch starts one intra-op thread per core in every process. Two such processes on one machine (the
``deepspeed`` launcher's local ranks, or two jobs of different people) then fight over every core and each runs
several times slower than with its share (two runs on 2 cores: 680 tokens/s each with 2 threads, about 5,000
with 1). Unless ``OMP_NUM_THREADS`` says otherwise, a CPU process therefore takes the cores divided among the
local ranks, and no more cores than are idle when it starts (the processes running right now, read from
``/proc/stat``, and the 1-minute load average; whichever is lower).
"""
import contextlib
import io
import os
import sys
import time


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _procs_running():
    """Processes runnable right now (this one included), or None where /proc/stat does not exist."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def busy_elsewhere(samples=5, interval=0.05):
    """About how many cores other processes keep busy: the fewest runnable processes seen over a few samples
    (a momentary spike is not a busy neighbour) minus this one, capped by the 1-minute load average."""
    seen = []
    for i in range(samples):
        n = _procs_running()
        if n is None:
            break
        seen.append(n - 1)
        if i + 1 < samples:
            time.sleep(interval)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    if not seen:
        return 0 if load is None else max(0, int(load))
    busy = min(seen)
    if load is not None:
        # Two jobs started together both see each other running but not yet in the load average: trust the
        # instantaneous count then; trust the average only to lower a count inflated by short-lived processes.
        if load >= 0.5:
            busy = min(busy, int(round(load)))
    return max(0, busy)


def cpu_threads(cores, local_size=1, busy=0):
    """Intra-op threads for one of ``local_size`` processes on ``cores`` cores with ``busy`` cores taken."""
    per_rank = max(1, cores // max(1, local_size))
    free = cores - busy
    return max(1, min(per_rank, free))


def set_cpu_threads(local_size=1, environ=None):
    """Set torch's intra-op threads for a CPU process (see the module docstring); returns (threads, reason) or
    None when ``OMP_NUM_THREADS`` decides."""
    import torch
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS"):
        return None
    cores = usable_cores()
    busy = busy_elsewhere() if cores > 1 else 0
    threads = cpu_threads(cores, local_size, busy)
    if threads == torch.get_num_threads():
        return None
    torch.set_num_threads(threads)
    reasons = []
    if local_size > 1:
        reasons.append(f"{local_size} local processes")
    if busy:
        reasons.append(f"about {busy} core(s) busy with other processes")
    return threads, f"{threads} of {cores} cores ({', '.join(reasons)}); set OMP_NUM_THREADS to choose"


@contextlib.contextmanager
def quiet_deepspeed_stdout():
    """DeepSpeed prints ``DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully`` on stdout
    when its process group starts on CPU (deepspeed/comm/torch.py, build_shm_op): drop that line, pass anything
    else on to stderr, so stdout carries only what the program means to say."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if not (line.startswith("DeepSpeed ") and line.endswith(" built successfully")):
                print(line, file=sys.stderr)
