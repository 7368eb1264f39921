"""A lost rank stops the job in bounded time: every rank keeps a heartbeat file in the (shared) output folder.

Each rank's thread rewrites ``<output>/.alive/rank<N>`` (its host name) every ``timeout / 8`` seconds. A file not
rewritten for ``timeout / 2`` means its process or node is gone. The thread of every survivor notices that on its
own (a NCCL collective on GPUs waits for a lost peer without end) and ends the process with one line naming the
lost ranks and the checkpoint to resume from; a collective that fails first (gloo sees the closed socket) is
explained the same way (``lost_ranks``). A rank that ends (finished, or failed on its own) writes "<host> done":
rank 0 may still be exporting the model long after the others are through. The output lock is an flock,
released when the process ends.
"""
import contextlib
import os
import socket
import sys
import threading
import time

ALIVE_DIR = ".alive"
DONE = "done"  # what a rank that ended writes in its heartbeat file


class Watchdog:
    def __init__(self, folder, rank, world_size, timeout, on_lost):
        """``on_lost(lost)`` gives the one line for lost ranks (a list of "rank R (host)")."""
        self.dir = os.path.join(folder, ALIVE_DIR)
        self.rank, self.world_size, self.timeout = rank, world_size, float(timeout)
        self.interval, self.stale = self.timeout / 8, self.timeout / 2
        self.on_lost = on_lost
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread = None

    def _path(self, rank):
        return os.path.join(self.dir, f"rank{rank}")

    def _beat(self):  # the host name alone: alive
        try:
            with open(self._path(self.rank), "w") as f:
                f.write(self.host)
        except OSError:
            pass  # a full or vanished disk is reported by the checkpoint save, not here

    def start(self):
        """Beat once (every rank has a file before anyone looks), then keep beating and watching in a thread."""
        if self.world_size == 1:
            return self
        os.makedirs(self.dir, exist_ok=True)
        self._beat()
        self._started = time.time()
        self._thread = threading.Thread(target=self._watch, name="fastroberta-watchdog", daemon=True)
        self._thread.start()
        return self

    def lost_ranks(self):
        """"rank R (host)" of every other rank whose heartbeat is older than ``timeout / 2``."""
        now, lost = time.time(), []
        for r in range(self.world_size):
            if r == self.rank:
                continue
            try:
                # A file older than this run (a killed earlier one left it) counts from our start, like a missing
                # one: that rank may simply start later than this one.
                age = now - max(os.path.getmtime(self._path(r)), self._started)
                with open(self._path(r)) as f:
                    host, _, state = f.read().strip().partition(" ")
            except OSError:
                age, host, state = now - self._started, "?", ""
            if state != DONE and age > self.stale:
                lost.append(f"rank {r} ({host})")
        return lost

    def wait_for_lost(self):
        """After a failed collective: the lost ranks, waiting until their heartbeats are stale (at most
        ``timeout / 2`` plus one beat); [] when every peer is still alive."""
        deadline = time.time() + self.stale + self.interval
        while True:
            lost = self.lost_ranks()
            if lost or time.time() > deadline:
                return lost
            time.sleep(min(1.0, self.interval))

    def _watch(self):
        while not self._stop.wait(self.interval):
            self._beat()
            lost = self.lost_ranks()
            if lost:
                print(self.on_lost(lost), file=sys.stderr, flush=True)
                os._exit(1)  # the main thread may be stuck in a collective that never returns

    def stop(self):
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:  # a rank that ended (finished, or failed on its own) is not a lost one
            with open(self._path(self.rank), "w") as f:
                f.write(f"{self.host} {DONE}")
        except OSError:
            pass


def lost_text(prog, lost, ckpt_dir):
    from fastroberta.training.checkpoints import last_good_checkpoint
    return (f"{', '.join(lost)} stopped responding (its process or node is gone); {last_good_checkpoint(ckpt_dir)}: "
            "continue with --resume")


@contextlib.contextmanager
def watching(s, timeout, prog):
    """Heartbeats and the watchdog around a run of ``s.world_size`` ranks; an exception while a peer is lost
    (a failed collective) becomes one TrainingError naming it and the checkpoint to resume from."""
    from fastroberta.training.errors import ConfigError, TrainingError
    dog = Watchdog(s.output, s.rank, s.world_size, timeout,
                   lambda lost: f"{prog}: error: {lost_text(prog, lost, s.ckpt_dir)}").start()
    try:
        yield dog
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception:
        lost = dog.wait_for_lost() if s.world_size > 1 else []
        if lost:
            raise TrainingError(lost_text(prog, lost, s.ckpt_dir)) from None
        raise
    finally:
        dog.stop()
