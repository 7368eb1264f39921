"""The training progress display: a tqdm bar on a terminal; elsewhere (a log file, a pipe, a CI job) plain
lines now and then instead of the bar's carriage-return redraws, which fill a log with kilobytes of
half-lines.

    train: step 120/600 (20%) loss=6.013 acc=0.081 tok_s=9120 elapsed 0:14 eta 0:56
"""
import sys
import time


def _clock(seconds):
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class PlainProgress:
    """tqdm's calls that the trainer uses (update, set_postfix, write, close), printed as a line per
    ``interval`` seconds, on the first step and on the last."""

    def __init__(self, total, initial=0, desc="train", file=None, interval=15.0, disable=False):
        self.total, self.n, self.desc = total, initial, desc
        self.file = file or sys.stderr
        self.interval, self.disable = interval, disable
        self.postfix = {}
        self._start = time.monotonic()
        self._start_n = initial
        self._last = None
        self._due = False

    def set_postfix(self, refresh=True, **values):
        self.postfix = {k: str(v) for k, v in values.items()}
        if refresh or self._due:
            self._print()

    def update(self, n=1):
        # The line is printed by the set_postfix that follows (the trainer's order), or by close().
        self.n += n
        now = time.monotonic()
        self._due = self._last is None or now - self._last >= self.interval or self.n >= self.total

    def _line(self):
        elapsed = time.monotonic() - self._start
        done = self.n - self._start_n
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = f" eta {_clock(elapsed / done * (self.total - self.n))}" if done > 0 and self.total else ""
        post = "".join(f" {k}={v}" for k, v in self.postfix.items())
        return f"{self.desc}: step {self.n}/{self.total}{pct}{post} elapsed {_clock(elapsed)}{eta}"

    def _print(self):
        if self.disable:
            return
        print(self._line(), file=self.file, flush=True)
        self._last = time.monotonic()
        self._due = False

    def write(self, msg, file=None):
        # Like tqdm.write: messages go out even when the progress lines are switched off.
        print(msg, file=file or self.file, flush=True)

    def close(self):
        if self._due:
            self._print()


def progress_bar(total, initial=0, desc="train", disable=False, file=None, interval=15.0):
    """A tqdm bar when ``file`` (stderr by default) is a terminal, PlainProgress otherwise."""
    file = file or sys.stderr
    if disable or not _is_terminal(file):
        return PlainProgress(total, initial=initial, desc=desc, file=file, interval=interval, disable=disable)
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=file)


def _is_terminal(file):
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False
