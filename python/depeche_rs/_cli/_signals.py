"""Stopping on SIGTERM / SIGINT without ever leaving half a batch.

The first signal only sets a flag: the batch in progress finishes (the Rust engine runs
Python's signal handlers every 100 ms while it waits, and ours does not raise) and the loop
stops before the next one. If the batch is not done `stop_timeout` seconds later, or a
second signal comes, the handler raises `Abandoned` inside the engine's wait: the engine
drops its connection, PostgreSQL rolls the batch back whole, and the command still exits 0.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Abandoned(BaseException):
    """A forced stop: the batch in progress is abandoned (rolled back) whole.

    A `BaseException`, like `KeyboardInterrupt`, so that no `except Exception` on the
    way swallows it.
    """


class StopSignal:
    """The stop flag set by SIGTERM / SIGINT, and the handlers that set it."""

    def __init__(self, stop_timeout: float) -> None:
        self.stop_timeout = stop_timeout
        self.requested = False
        self.signal_name: str | None = None
        self._disarmed = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Install the handlers (main thread only; elsewhere signals cannot be caught)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_stop)
        self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_timeout)

    def disarm(self) -> None:
        """Cancel the forced stop: the loop is over, only cleanup is left, and further
        signals are ignored (the process is exiting anyway)."""
        self._disarmed = True
        if self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def restore(self) -> None:
        """Put the previous handlers back."""
        self.disarm()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def request(self, name: str) -> None:
        """Ask the loop to stop, as a signal would (without the forced-stop timer)."""
        self.requested = True
        self.signal_name = self.signal_name or name

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        if self._disarmed:
            return
        name = signal.Signals(signum).name
        if self.requested:
            raise Abandoned(f"second {name}")
        self.requested = True
        self.signal_name = name
        signal.setitimer(signal.ITIMER_REAL, self.stop_timeout)

    def _on_timeout(self, signum: int, frame: FrameType | None) -> None:
        if self._disarmed:
            return
        raise Abandoned(f"the batch in progress did not finish within {self.stop_timeout:g} s")
