"""The run folder: checked before any work, locked by one run at a time, files in it replaced atomically."""
import contextlib
import errno
import fcntl
import os
import socket

from fastroberta.training.errors import ConfigError, os_error_text

LOCK_FILE = ".lock"


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


def atomic_write(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
