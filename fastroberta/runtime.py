"""What every DeepSpeed job of fastroberta shares: the process group, RNG streams, the output-folder lock,
checkpoints that verify themselves, the non-finite-loss guard, stop signals and one-line errors.

Checkpoints: DeepSpeed writes ``<checkpoints>/global_step<N>.tmp``; every rank then checksums its share of the
files, rank 0 writes ``manifest.json`` (size and SHA-256 of each file) last, renames the folder to
``global_step<N>`` and only then moves ``latest``. A checkpoint is intact when its manifest exists and every file
matches it. ``--resume`` verifies before loading; when the newest checkpoint is damaged it warns and falls back to
the newest intact one (an explicitly named damaged checkpoint is an error that names the intact one instead).
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import traceback

import numpy as np
import torch

from fastroberta.ds_config import ConfigError

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"  # DeepSpeed's own pointer file name, so engine.load_checkpoint(dir) and its tools agree
TAG_RE = re.compile(r"^global_step(\d+)$")
TMP_SUFFIX = ".tmp"  # a checkpoint being written
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"


class TrainingError(RuntimeError):
    """The run cannot go on (repeated non-finite losses, a damaged checkpoint, a full disk, ...): exit 1."""


# ----------------------------------------------------------------------------------------------------------
# Process group and RNG
# ----------------------------------------------------------------------------------------------------------
def world():
    """(rank, world size) from the launcher's environment; a plain process is rank 0 of 1."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(on_cuda, local_rank):
    """Start (or join) the process group; returns (device, CPU thread choice or None). A plain process without
    the launcher becomes a group of one."""
    from fastroberta import host
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
            deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo", verbose=False)
    return device, threads


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def preserved_rng():
    """Evaluation and checkpointing must not shift the training RNG streams: resume would drift otherwise."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# One run per output folder
# ----------------------------------------------------------------------------------------------------------
def check_output_folder(path, flag="--output"):
    """ConfigError unless ``path`` is (or can become) a writable folder. Creates nothing."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} is an existing file, not a folder; choose another {flag}")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"{flag} {path!r} cannot be created: {probe!r} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path!r} is not writable (no write permission on {probe!r}); choose another "
                          f"{flag}")


class OutputLock:
    """An exclusive ``flock`` on ``<folder>/.lock`` for the run's lifetime. The kernel drops it when the
    process dies, however it dies, so a crashed run never leaves the folder locked."""

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)
        self.fd = None
        self.created_folder = False

    def acquire(self):
        try:
            self.created_folder = not os.path.isdir(self.folder)
            os.makedirs(self.folder, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"--output {self.folder!r} cannot be used: {os_error_text(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                owner = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            finally:
                os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ConfigError(f"{self.folder} is in use by another run ({owner}); wait for it to finish or "
                                  "choose another --output") from None
            raise ConfigError(f"--output {self.folder!r}: cannot lock {self.path}: {os_error_text(e)}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd
        return self

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False

    def release(self):
        """Unlock; when this run created the folder and left nothing else in it, remove it again."""
        if self.fd is None:
            return
        os.close(self.fd)
        self.fd = None
        if self.created_folder:
            with contextlib.suppress(OSError):
                if os.listdir(self.folder) == [LOCK_FILE]:
                    os.remove(self.path)
                    os.rmdir(self.folder)


# ----------------------------------------------------------------------------------------------------------
# Errors a user can act on
# ----------------------------------------------------------------------------------------------------------
def os_error_text(e):
    """'no space left on <folder> (<free> free)' and similar plain words for an OSError."""
    where = e.filename or ""
    if e.errno == errno.ENOSPC:
        return no_space_text(where)
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where}"
    if e.errno == errno.EROFS:
        return f"read-only file system: {where}"
    reason = e.strerror or str(e)
    return f"{reason}: {where}" if where else reason


def no_space_text(path):
    folder = path or "."
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        free = shutil.disk_usage(folder or ".").free
        free_text = f", {free / 2**20:.0f} MiB free"
    except OSError:
        free_text = ""
    return f"no space left on the device holding {folder or path}{free_text}"


def is_disk_full(exc):
    """True for ENOSPC anywhere in the exception chain, and for the messages torch's zip writer gives when a
    write came up short (it reports positions, not errno)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left" in text or "unexpected pos" in text or "file write failed" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# ----------------------------------------------------------------------------------------------------------
# Non-finite losses
# ----------------------------------------------------------------------------------------------------------
class NonFiniteGuard:
    """Counts consecutive bad steps: a non-finite loss in any precision, whatever DeepSpeed did with the step;
    under fp16 also a step the loss scaler skipped while its scale sat at the minimum (it cannot recover).
    Ordinary fp16 overflow steps, skipped with a finite loss and a scale above the minimum, are normal."""

    def __init__(self, limit, streak=0):
        self.limit = limit
        self.streak = streak

    def update(self, loss, skipped=False, loss_scale=None, min_loss_scale=None):
        """Record one optimizer step; True when the run must stop."""
        stuck = skipped and loss_scale is not None and min_loss_scale is not None and loss_scale <= min_loss_scale
        if not math.isfinite(loss) or stuck:
            self.streak += 1
        else:
            self.streak = 0
        return self.limit > 0 and self.streak >= self.limit


def parameters_finite(module):
    """True when every parameter (this rank's ZeRO-3 partition of it) is finite; no collective."""
    for p in module.parameters():
        data = getattr(p, "ds_tensor", p)
        if data.numel() and not torch.isfinite(data.detach()).all():
            return False
    return True


def all_ranks_true(flag, device):
    import torch.distributed as dist
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.item() == 0.0


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
def atomic_write(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_tags(ckpt_dir):
    """Tag folders in ``ckpt_dir``, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [(int(m.group(1)), name) for name in os.listdir(ckpt_dir)
            if (m := TAG_RE.match(name)) and os.path.isdir(os.path.join(ckpt_dir, name))]
    return [name for _, name in sorted(tags)]


def _files_under(folder):
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _digests(folder, names):
    return {n: {"size": os.path.getsize(os.path.join(folder, n)), "sha256": file_digest(os.path.join(folder, n))}
            for n in names}


def write_manifest(folder, rank=0, world_size=1):
    """Checksum every file of ``folder`` (the ranks share the work) and let rank 0 write the manifest."""
    import torch.distributed as dist
    names = _files_under(folder)
    mine = _digests(folder, names[rank::world_size])
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, mine)
    else:
        parts = [mine]
    if rank == 0:
        files = {}
        for part in parts:
            files.update(part)
        atomic_write(os.path.join(folder, MANIFEST), json.dumps({"format": 1, "files": files}, indent=1))


def verify_checkpoint(folder):
    """None when ``folder`` is an intact checkpoint, else what is wrong with it (one phrase)."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        return "it does not exist"
    if not os.path.isfile(manifest_path):
        return f"it has no {MANIFEST} (its save never completed, or an older fastroberta wrote it)"
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({e})"
    for name, entry in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        size = os.path.getsize(path)
        if size != entry["size"]:
            return f"{name} has {size} bytes, {entry['size']} were written"
        if file_digest(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def newest_intact(ckpt_dir, below=None, exclude=None):
    """The newest intact tag in ``ckpt_dir`` (older than step ``below`` when given, other than ``exclude``), or
    None."""
    for tag in reversed(checkpoint_tags(ckpt_dir)):
        if tag == exclude or (below is not None and int(TAG_RE.match(tag).group(1)) >= below):
            continue
        if verify_checkpoint(os.path.join(ckpt_dir, tag)) is None:
            return tag
    return None


def latest_pointer(ckpt_dir):
    """What ``<ckpt_dir>/latest`` says, as written ("" when it is missing or empty)."""
    try:
        with open(os.path.join(ckpt_dir, LATEST)) as f:
            return f.read().strip()
    except OSError:
        return ""


def _read_latest(ckpt_dir):
    """The tag ``latest`` names, or None; a pointer left on a renamed ``.tmp`` folder names the final one."""
    tag = latest_pointer(ckpt_dir)
    if not tag:
        return None
    if tag.endswith(TMP_SUFFIX) and not os.path.isdir(os.path.join(ckpt_dir, tag)):
        tag = tag[:-len(TMP_SUFFIX)]  # the save was interrupted between its rename and the pointer update
    return tag


def find_checkpoint(path, explicit, warn):
    """(checkpoints folder, tag) to resume from, verified. ``path`` is a checkpoints folder or one
    global_step<N> folder. A damaged newest checkpoint of a folder falls back to the newest intact one with
    a warning; a damaged checkpoint named explicitly is an error naming the newest intact one. None when a
    plain --resume finds no checkpoint at all."""
    norm = os.path.normpath(path)
    if TAG_RE.match(os.path.basename(norm)) or os.path.basename(norm).endswith(TMP_SUFFIX):
        ckpt_dir, tag = os.path.dirname(norm), os.path.basename(norm)
        if not os.path.isdir(norm):
            raise ConfigError(f"--resume {path!r} does not exist")
        problem = verify_checkpoint(norm)
        if problem is not None:
            raise TrainingError(f"checkpoint {norm} is damaged: {problem}; {intact_hint(ckpt_dir, tag)}")
        return ckpt_dir, tag
    ckpt_dir = norm
    tags = checkpoint_tags(ckpt_dir)
    has_latest = os.path.isfile(os.path.join(ckpt_dir, LATEST))
    if not has_latest and not tags:
        if explicit:
            raise ConfigError(f"--resume {path!r} is neither a checkpoints folder with a '{LATEST}' file nor a "
                              "global_step<N> checkpoint folder")
        return None
    tag = _read_latest(ckpt_dir) if has_latest else None
    if not tag:
        problem = f"{os.path.join(ckpt_dir, LATEST)} is empty or unreadable"
    elif not TAG_RE.match(tag):
        problem = f"{os.path.join(ckpt_dir, LATEST)} names {tag!r}, not a global_step<N> checkpoint"
    else:
        problem = verify_checkpoint(os.path.join(ckpt_dir, tag))
        if problem is None:
            return ckpt_dir, tag
        problem = f"checkpoint {os.path.join(ckpt_dir, tag)} is damaged: {problem}"
    fallback = newest_intact(ckpt_dir)
    if fallback is None:
        raise TrainingError(f"{problem}, and {ckpt_dir} holds no intact checkpoint to resume from; start afresh "
                            "with --overwrite")
    warn(f"{problem}; resuming from the newest intact checkpoint, {os.path.join(ckpt_dir, fallback)}")
    return ckpt_dir, fallback


def intact_hint(ckpt_dir, tag):
    """Words for an error about checkpoint ``tag``: the newest intact checkpoint to resume from instead, an older
    one first, never ``tag`` itself."""
    m = TAG_RE.match(tag.removesuffix(TMP_SUFFIX))
    intact = (newest_intact(ckpt_dir, below=int(m.group(1))) if m else None) or \
        newest_intact(ckpt_dir, exclude=tag)
    if intact is None:
        return f"{ckpt_dir} holds no other intact checkpoint; start afresh with --overwrite"
    return f"the newest intact one is {os.path.join(ckpt_dir, intact)}: pass it to --resume"


def remove_partial_checkpoints(ckpt_dir):
    """Delete the ``*.tmp`` folders of saves that never completed (they only take space)."""
    if not os.path.isdir(ckpt_dir):
        return
    for name in os.listdir(ckpt_dir):
        if name.endswith(TMP_SUFFIX) and os.path.isdir(os.path.join(ckpt_dir, name)):
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def save_checkpoint(engine, ckpt_dir, step, rank, world_size, trainer_state, client_state, keep_last):
    """DeepSpeed checkpoint ``global_step<step>`` plus each rank's ``trainer_state`` (RNG, data position).
    Written under a temporary tag, checksummed into a manifest, renamed once complete, and only then does
    ``latest`` move to it: at every instant ``latest`` names a complete checkpoint. A write that fails (a full
    disk above all) removes the partial folder and raises TrainingError; ``latest`` stays where it was."""
    import torch.distributed as dist
    tag = f"global_step{step}"
    tmp_tag = tag + TMP_SUFFIX
    final_dir, tmp_dir = os.path.join(ckpt_dir, tag), os.path.join(ckpt_dir, tmp_tag)
    if rank == 0:
        remove_partial_checkpoints(ckpt_dir)  # debris of attempts that never completed
    dist.barrier()
    failed = None
    try:
        os.makedirs(tmp_dir, exist_ok=True)
        torch.save(trainer_state, os.path.join(tmp_dir, f"trainer_state_rank{rank}.pt"))
        engine.save_checkpoint(ckpt_dir, tag=tmp_tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as e:
        failed = e
    ok = all_ranks_true(failed is None, torch.device("cpu") if not torch.cuda.is_available()
                        else torch.device("cuda", torch.cuda.current_device()))
    if not ok:
        if rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        dist.barrier()
        raise _save_failure(failed, ckpt_dir, step)
    try:
        write_manifest(tmp_dir, rank, world_size)
    except OSError as e:
        if rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise _save_failure(e, ckpt_dir, step) from None
    dist.barrier()
    if rank == 0:
        latest = os.path.join(ckpt_dir, LATEST)
        if os.path.isdir(final_dir):
            # Only when re-saving a step (resumed from an older checkpoint of this folder): point at the
            # complete temporary copy while the old one is replaced.
            atomic_write(latest, tmp_tag)
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
        atomic_write(latest, tag)
        if keep_last:
            tags = [t for t in checkpoint_tags(ckpt_dir) if int(TAG_RE.match(t).group(1)) <= step]
            for old in tags[:-keep_last]:
                shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    dist.barrier()
    return final_dir


def _save_failure(exc, ckpt_dir, step):
    latest = _read_latest(ckpt_dir)
    kept = f"{LATEST} still names {os.path.join(ckpt_dir, latest)}" if latest else "no earlier checkpoint exists"
    if exc is None:
        return TrainingError(f"saving the checkpoint of step {step} failed on another rank; {kept}")
    if is_disk_full(exc):
        what = no_space_text(ckpt_dir)
    elif isinstance(exc, OSError):
        what = os_error_text(exc)
    else:
        what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return TrainingError(f"could not save the checkpoint of step {step}: {what}; the partial checkpoint was "
                         f"removed and {kept}")


# ----------------------------------------------------------------------------------------------------------
# Stop signals
# ----------------------------------------------------------------------------------------------------------
class StopRequest:
    """SIGTERM / SIGINT ask for a checkpoint at the next step boundary; a second signal acts as usual."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handler(self, signum, frame):
        self.requested = True
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self):
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread: no handlers, the run is not interruptible that way
            self._previous = {}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def debug_requested(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("FASTROBERTA_DEBUG", "") not in ("", "0")


def run_command(prog, run, argv=None):
    """A console entry point's exit status for ``run(argv)``: 0 on success, 2 for bad input (ConfigError), 1 when
    the run failed (TrainingError, a full disk, anything unexpected), 130 on Ctrl-C. Every error is one line
    ``<prog>: error: ...`` on stderr; ``--debug`` or FASTROBERTA_DEBUG=1 prints the traceback first."""
    debug = debug_requested(argv)

    def fail(error, code):
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        return code

    try:
        run(argv)
    except ConfigError as e:
        return fail(e, 2)
    except TrainingError as e:
        return fail(e, 1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        return fail(no_space_text(e.filename or "") if is_disk_full(e) else os_error_text(e), 1)
    except Exception as e:  # a bug or an environment problem: still one line, the traceback on request
        text = str(e).splitlines()[0] if str(e) else ""
        if is_disk_full(e):
            return fail(f"{no_space_text('.')} ({text})", 1)
        return fail(f"{type(e).__name__}: {text} (run again with --debug for the traceback)", 1)
    return 0
