"""Stop signals: SIGTERM / SIGINT end a run cleanly at the next step boundary, with a checkpoint."""
import signal


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
