"""The machine a CPU job runs on: how many threads each process should use when the cores are shared, and what
DeepSpeed's start-up costs there (its shared-memory comm op, its stray stdout line).

Threads: torch starts one intra-op thread per core in every process. Two such processes on one machine (the
``deepspeed`` launcher's local ranks, or two jobs of different people) then fight over every core and each runs
several times slower than with its share (two runs on 2 cores: 680 tokens/s each with 2 threads, about 5,000
with 1). Unless ``OMP_NUM_THREADS`` says otherwise, a CPU process therefore takes the cores divided among the
local ranks, and no more cores than are idle when it starts (the processes running right now, read from
``/proc/stat``, and the 1-minute load average; whichever is lower).
"""
import contextlib
import hashlib
import io
import os
import sys
import time

SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU all-reduce over shared memory, JIT-built by its process group


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
    return threads, threads_reason(threads, cores, local_size, busy)


def threads_reason(threads, cores, local_size, busy):
    """The cpu-threads line: the choice and why. ``busy`` counts runnable processes, which may exceed the cores
    (a load of 5 on 2 cores): then all cores are busy, and the count is given as what it is."""
    reasons = []
    if local_size > 1:
        reasons.append(f"{local_size} local processes share them")
    if busy >= cores:
        reasons.append(f"all {cores} busy with other processes, about {busy} running")
    elif busy:
        reasons.append(f"{busy} of them busy with other processes")
    return (f"{threads} of {cores} cores ({'; '.join(reasons)}); set OMP_NUM_THREADS to choose" if reasons else
            f"{threads} of {cores} cores; set OMP_NUM_THREADS to choose")


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


# Start-up on CPU: DeepSpeed's process group JIT-builds SHM_OP with ninja (tens of seconds to a minute and more on
# a busy 2-core machine) into torch's extensions folder. The op serves only when every rank is on this host
# (DeepSpeed's own test, shm_interface.cpp: LOCAL_SIZE == world size): a single process, ranks spread over several
# nodes, or a launcher that sets no LOCAL_SIZE (torchrun) never use it, so DeepSpeed's own table of compatible ops
# (deepspeed.ops.__compatible_ops__, a dict it keeps so that edits persist) is told so and build_shm_op returns
# None. Several processes on one host do use it; they build it into a folder of this environment's own (torch's
# default is shared by every environment of a user, and two of them with other DeepSpeed or torch versions, or the
# same versions installed elsewhere, rebuild the op on every alternate start). A build killed half-way (Ctrl-C)
# leaves torch's lock file behind, and every later start would wait on it for ever: such a lock is removed.

STALE_LOCK_AGE_S = 60  # torch writes build.ninja and starts ninja within a second of taking the lock


def extensions_dir():
    """The folder for JIT-built ops of this environment (read without importing DeepSpeed): under torch's default
    root, named by Python, torch and DeepSpeed's versions and where they are installed (their paths are in the
    build's command lines, so two installs of the same versions would each rebuild over the other's objects), so
    a fresh environment at the same place with the same versions (CI's new clone) reuses the build."""
    import sysconfig
    from importlib.metadata import version
    from importlib.util import find_spec
    import torch
    from torch.utils.cpp_extension import get_default_build_root
    python = f"{sys.implementation.cache_tag}-{sys.platform}|{sysconfig.get_path('include')}"
    deepspeed = f"{version('deepspeed')}|{os.path.dirname(find_spec('deepspeed').origin)}"
    torch_ = f"{torch.__version__}|{os.path.dirname(torch.__file__)}"
    tag = hashlib.sha1(f"{python}|{torch_}|{deepspeed}".encode()).hexdigest()[:10]
    return os.path.join(get_default_build_root(), f"fastroberta-{tag}")


def _building_in(folder):
    """True when a process on this host runs in ``folder`` (torch runs ninja there); None where /proc cannot say."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    folder = os.path.realpath(folder)
    for pid in pids:
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if cwd == folder or cwd.startswith(folder + os.sep):
            return True
    return False


def clear_stale_build_lock(build_dir, now=None):
    """Remove ``build_dir``/lock when no build holds it (no process works in the folder and the lock is older
    than STALE_LOCK_AGE_S; without /proc, older than ten minutes). Returns the removed path or None."""
    lock = os.path.join(build_dir, "lock")
    try:
        age = (time.time() if now is None else now) - os.path.getmtime(lock)
    except OSError:
        return None
    building = _building_in(build_dir)
    if age < STALE_LOCK_AGE_S or building or (building is None and age < 600):
        return None
    try:
        os.remove(lock)
    except OSError:
        return None
    return lock


def shm_op_built(build_dir):
    return os.path.isfile(os.path.join(build_dir, SHM_OP + ".so"))


def local_size():
    """Ranks on this host as DeepSpeed's shared-memory op counts them (LOCAL_SIZE, set by the deepspeed launcher;
    0 when no launcher set it)."""
    try:
        return int(os.environ.get("LOCAL_SIZE", "0"))
    except ValueError:
        return 0


def shm_op_used(world_size, local):
    """Whether DeepSpeed's process group would use SHM_OP: several ranks, every one of them on this host."""
    return world_size > 1 and local == world_size


def cpu_start_note(world_size, local=None):
    """What DeepSpeed's CPU start will build, said before it starts (cheap: DeepSpeed is not imported). When the op
    is used it points TORCH_EXTENSIONS_DIR (unless set) at this environment's folder and removes a stale lock there
    first."""
    local = local_size() if local is None else local
    if world_size == 1:
        return "one process: no communication op to build"
    if not shm_op_used(world_size, local):
        if local == 0:  # torchrun sets LOCAL_WORLD_SIZE, which DeepSpeed's op does not read
            return "no LOCAL_SIZE from the launcher, so DeepSpeed uses no shared-memory op: nothing to build"
        return "ranks on several hosts: no shared-memory communication op to build"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    build_dir = os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], SHM_OP)
    removed = clear_stale_build_lock(build_dir)
    note = f"; removed the lock an interrupted build left, {removed}" if removed else ""
    if shm_op_built(build_dir):
        return f"its shared-memory communication op is built already{note}"
    return (f"the first start in this environment builds its shared-memory communication op once (about a "
            f"minute on 2 cores) into {build_dir}{note}")


def skip_unused_shm_op(world_size, local=None):
    """Tell DeepSpeed not to build SHM_OP where its process group would not use it (see above)."""
    if shm_op_used(world_size, local_size() if local is None else local):
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as init_distributed does, before DeepSpeed is imported
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__[SHM_OP] = False
