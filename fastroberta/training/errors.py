"""Failures a user reads as one line, and the exit status of a command.

``ConfigError`` (bad input: a flag, a data file and line, the output folder) exits 2; ``TrainingError`` (the run
failed) and anything unexpected exit 1; ``run_command`` turns each into ``<prog>: error: ...`` on stderr, with the
traceback only on ``--debug`` / ``FASTROBERTA_DEBUG=1``.
"""
import errno
import os
import shutil
import sys
import traceback


class ConfigError(ValueError):
    """A run configuration that cannot work; raised before any expensive work starts."""


class TrainingError(RuntimeError):
    """The run cannot go on (repeated non-finite losses, a damaged checkpoint, a full disk, ...): exit 1."""


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
