"""The Executor: runs projectors and subscription runners when their channel is notified.

    executor = Executor(db_dsn="postgresql://localhost:5432/mydb")
    executor.register(stream.projector)
    executor.register(subscription.runner)
    executor.run()  # until SIGTERM or SIGINT

When handlers run and on which threads: docs/subscriptions.md ("The Executor"). Each
`StreamProjector` has a thread of its own so that a busy subscription never delays
projection; the other handlers share one, as in depeche-db.
"""

from __future__ import annotations

import collections
import logging
import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

import psycopg

from .._db.connection import libpq_form, redact
from .._exceptions import DatabaseConnectionError
from .._interfaces import FixedTimeBudget, RunOnNotification, RunOnNotificationResult
from .._projection.projector import StreamProjector
from .live import Backoff, ListenConnection, LiveRuntime

logger = logging.getLogger("depeche_rs.executor")

# How long one `run()` of a handler may go on before others get their turn.
_RUN_BUDGET_SECONDS = 1.0


class _Worker:
    """A thread running queued handlers one at a time; a handler is queued at most once."""

    def __init__(self, name: str, on_error: Any) -> None:
        # The queue: id -> handler, in the order they were queued.
        self._queue: dict[int, RunOnNotification] = {}
        self._ready = threading.Condition()
        self._stopping = False
        self._on_error = on_error
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def put(self, handler: RunOnNotification) -> None:
        with self._ready:
            self._queue.setdefault(id(handler), handler)
            self._ready.notify()

    def stop(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify_all()

    def _next(self) -> RunOnNotification | None:
        with self._ready:
            self._ready.wait_for(lambda: self._queue or self._stopping)
            return None if self._stopping else self._queue.pop(next(iter(self._queue)))

    def _run(self) -> None:
        while True:
            handler = self._next()
            if handler is None:
                return
            try:
                result = handler.run(budget=FixedTimeBudget(seconds=_RUN_BUDGET_SECONDS))
            except BaseException as exc:
                self.error = exc
                self._on_error(exc)
                return
            if result == RunOnNotificationResult.WORK_REMAINING:
                self.put(handler)


class Executor:
    """Runs registered handlers (`RunOnNotification`) on notifications.

    Args:
        db_dsn: DSN of the PostgreSQL database (libpq URL; `postgresql+psycopg://` is
            accepted).
        stimulation_interval: Every this many seconds, the first time when `run()` starts,
            every handler runs once whether notified or not; zero, negative or None
            disables it (handlers then run only on notifications).
        disable_signals: Do not install SIGINT/SIGTERM handlers (needed to construct the
            Executor outside the main thread); stop it with `stop()`.
    """

    # The LISTEN connection of the running executor (None before `run()`).
    listener: ListenConnection | None = None

    def __init__(
        self,
        db_dsn: str,
        stimulation_interval: float | None = 0.5,
        disable_signals: bool = False,
    ) -> None:
        if not isinstance(db_dsn, str):
            raise TypeError(f"db_dsn must be a DSN string, got {type(db_dsn).__name__}")
        self._db_dsn = libpq_form(db_dsn)
        self.channel_register: dict[str, list[RunOnNotification]] = collections.defaultdict(list)
        self.stimulation_interval = stimulation_interval
        self.keep_running = True
        self.listener = None
        self._runtime: LiveRuntime[RunOnNotification] | None = None
        self._workers: dict[int, _Worker] = {}
        self._shared_worker = _Worker("depeche-rs-handlers", self._on_handler_error)
        if not disable_signals:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError(
                    "Executor installs SIGINT/SIGTERM handlers, which only the main thread "
                    "can do: pass disable_signals=True and call stop() yourself"
                )
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGTERM, self._on_signal)

    def register(self, handler: RunOnNotification) -> RunOnNotification:
        """Register a handler to run on notifications of its `notification_channel`."""
        self.channel_register[handler.notification_channel].append(handler)
        return handler

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        logger.info("received signal %s, stopping", signum)
        self.stop()

    def stop(self) -> None:
        """Stop the executor: handlers finish the message they are on, `run()` returns.

        Safe to call from a signal handler or another thread.
        """
        self.keep_running = False
        if self._runtime is not None:
            self._runtime.stop()
        for handler in self._handlers():
            handler.stop()
        self._shared_worker.stop()
        for worker in self._workers.values():
            worker.stop()

    # depeche-db's name.
    _stop = stop

    def _handlers(self) -> Iterable[RunOnNotification]:
        for handlers in list(self.channel_register.values()):
            yield from handlers

    def _queue(self, handler: RunOnNotification) -> None:
        """The runtime's pass of a handler: queue it on its worker (which runs it again
        while it reports `WORK_REMAINING`)."""
        self._workers.get(id(handler), self._shared_worker).put(handler)

    def _on_handler_error(self, exc: BaseException) -> None:
        logger.error("a handler failed; stopping the executor", exc_info=exc)
        self.stop()

    def run(self) -> None:
        """Run until `stop()` (or SIGINT/SIGTERM).

        Raises:
            DatabaseConnectionError: the database could not be reached at start.
            Exception: what a handler raised (after stopping the other handlers).
        """
        if not self.keep_running:
            return
        self._add_workers()
        self.listener = ListenConnection(self._db_dsn, self.channel_register, "depeche-rs listener")
        self._runtime = LiveRuntime(
            self.listener,
            list(self._handlers()),
            self._queue,
            self.stimulation_interval,
            backoff=Backoff(initial=0.05, maximum=5.0),
            on_lost=lambda exc, delay: logger.warning(
                "LISTEN connection lost (%s); reconnecting in %.2fs", exc, delay
            ),
            on_reconnected=lambda down: logger.info(
                "LISTEN connection re-established after %.1fs; running every handler", down
            ),
        )
        if not self.keep_running:  # stopped while being set up
            return
        workers = [self._shared_worker, *self._workers.values()]
        try:
            try:
                self.listener.connect()
            except psycopg.OperationalError as exc:
                raise DatabaseConnectionError(
                    f"could not connect to PostgreSQL at {redact(self._db_dsn)} to LISTEN: {exc}"
                ) from exc
            for worker in workers:
                worker.thread.start()
            self._runtime.run()
        finally:
            self.stop()
            self.listener.close()
            for worker in workers:
                if worker.thread.is_alive():
                    worker.thread.join()
        self._report(workers)

    def _add_workers(self) -> None:
        """Threads of their own for some handlers (the rest share one)."""
        for handler in self._handlers():
            # Projectors are ours and thread-safe: give each its own thread.
            if isinstance(handler, StreamProjector) and id(handler) not in self._workers:
                self._workers[id(handler)] = _Worker("depeche-rs-projector", self._on_handler_error)

    def _report(self, workers: list[_Worker]) -> None:
        """After `run()`: raise what a handler raised."""
        for worker in workers:
            if worker.error is not None:
                raise worker.error
