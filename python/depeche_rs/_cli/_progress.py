"""Catch-up progress: one updating line on a TTY, a log line every few seconds otherwise.

The remaining backlog is measured with a count (see `_catalog.backlog`) when catch-up
starts and now and then afterwards; in between it is that count minus what was projected
since, which is exact unless new messages arrive meanwhile.
"""

from __future__ import annotations

import collections
import logging
import time

from ._logging import Console, event

_BAR_WIDTH = 24
_RATE_WINDOW_S = 5.0
_TTY_REFRESH_S = 0.1


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"


# By hand, not tqdm/rich: the line is shared with the log lines the Console writes, the total
# changes as the backlog is re-measured, and off a TTY the same figures go out as log events.
class CatchUpProgress:
    """Progress of one aggregated stream's catch-up."""

    def __init__(
        self,
        stream: str,
        backlog: int,
        console: Console,
        interval: float,
    ) -> None:
        self.stream = stream
        self.console = console
        self.interval = interval
        self.started = time.monotonic()
        self.done = 0
        self._measured = backlog
        self._done_at_measure = 0
        self._samples = collections.deque([(self.started, 0)])
        self._last_shown = self.started

    @property
    def remaining(self) -> int:
        """Messages still to project, as far as we know."""
        return max(0, self._measured - (self.done - self._done_at_measure))

    @property
    def elapsed(self) -> float:
        """Seconds since catch-up started."""
        return time.monotonic() - self.started

    def rate(self) -> float:
        """Messages per second over the last few seconds."""
        now = time.monotonic()
        while len(self._samples) > 2 and now - self._samples[1][0] > _RATE_WINDOW_S:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        return (self.done - n0) / (now - t0) if now > t0 else 0.0

    def advance(self, projected: int) -> None:
        """Count a batch and show the progress if it is time to."""
        self.done += projected
        now = time.monotonic()
        self._samples.append((now, self.done))
        if self.console.is_tty:
            if now - self._last_shown >= _TTY_REFRESH_S:
                self._last_shown = now
                self.console.status(self.render())
        elif now - self._last_shown >= self.interval:
            self._last_shown = now
            event(
                logging.INFO,
                "progress",
                f"{self.stream}: {self.render()}",
                stream=self.stream,
                projected=self.done,
                backlog=self.remaining,
                rate=round(self.rate(), 1),
            )

    def remeasured(self, backlog: int) -> None:
        """A fresh count of the backlog."""
        self._measured = backlog
        self._done_at_measure = self.done

    def render(self) -> str:
        """`catching up [#####-----] 41% 41,000 done, 59,000 left, 38,210 msg/s, ETA 2 s`."""
        remaining = self.remaining
        total = self.done + remaining
        fraction = self.done / total if total else 1.0
        filled = round(fraction * _BAR_WIDTH)
        rate = self.rate()
        eta = f", ETA {_duration(remaining / rate)}" if rate > 0 and remaining else ""
        bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
        prefix = f"{self.stream}: " if self.console.is_tty else ""
        return (
            f"{prefix}catching up [{bar}] {fraction:4.0%} {self.done:,} done, "
            f"{remaining:,} left, {rate:,.0f} msg/s{eta}"
        )

    def finish(self) -> None:
        """Remove the progress line."""
        self.console.clear_status()
