"""`ThreadedExecutor`: depeche-db's experimental executor that gives every handler a thread."""

from __future__ import annotations

import functools
import logging

from .._interfaces import RunOnNotification
from .._runtime.executor import Executor, _Worker

logger = logging.getLogger("depeche_rs.threaded_executor")


class ThreadedExecutor(Executor):
    """Runs registered handlers (`RunOnNotification`), each on its own thread.

    It listens, dispatches, stimulates and reconnects as the `Executor` does (one live
    runtime, `_runtime/live.py`); only the threads differ, so slow subscription handlers do
    not hold each other up. As in depeche-db, a handler that raises stops the executor, and
    `run()` logs the failure (kept in `failed_handlers`) instead of raising it.

    Args:
        db_dsn: DSN of the PostgreSQL database (libpq URL; `postgresql+psycopg://` is
            accepted).
        stimulation_interval: Every this many seconds, the first time when `run()` starts,
            every handler runs once whether notified or not; zero, negative or None
            disables it.
        disable_signals: Do not install SIGINT/SIGTERM handlers (needed to construct the
            executor outside the main thread); stop it with `stop()`.
    """

    def __init__(
        self,
        db_dsn: str,
        stimulation_interval: float | None = 0.5,
        disable_signals: bool = False,
    ) -> None:
        super().__init__(db_dsn, stimulation_interval, disable_signals)
        self.failed_handlers: dict[int, BaseException] = {}

    def _add_workers(self) -> None:
        for handler in self._handlers():
            if id(handler) not in self._workers:
                on_error = functools.partial(self._failed, handler)
                name = f"depeche-rs-handler-{len(self._workers)}"
                self._workers[id(handler)] = _Worker(name, on_error)

    def _failed(self, handler: RunOnNotification, exc: BaseException) -> None:
        self.failed_handlers[id(handler)] = exc
        self.stop()

    def _report(self, workers: list[_Worker]) -> None:
        """As in depeche-db, a failed handler is logged, not raised."""
        for handler_id, exc in list(self.failed_handlers.items()):
            logger.error("handler %s failed", handler_id, exc_info=exc)
