"""The Executor: runs projectors and subscription runners when their channel is notified.

    executor = Executor(db_dsn="postgresql://localhost:5432/mydb")
    executor.register(stream.projector)
    executor.register(subscription.runner)
    executor.run()  # until SIGTERM or SIGINT

A handler runs when a notification on its channel interests it, and, as in depeche-db,
every `stimulation_interval` seconds starting at `run()` (zero, negative or None: never),
nothing else. The one addition: after the listener had to reconnect, every handler runs
once, because notifications sent while it was away are lost.

Threads: the main thread reads notifications; each `StreamProjector` runs on a thread of
its own, so a busy subscription never delays projection; all other handlers share one
thread and run one at a time, as in depeche-db (user handlers never run concurrently
with each other).
"""

from __future__ import annotations

import collections
import logging
import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

from ._connection import libpq_form
from ._interfaces import FixedTimeBudget, RunOnNotification, RunOnNotificationResult
from .tools._pg_notification_listener import PgNotificationListener

logger = logging.getLogger("depeche_rs.executor")

# How long one `run()` of a handler may go on before others get their turn.
_RUN_BUDGET_SECONDS = 1.0


class _Worker:
    """A thread running queued handlers one at a time; a handler is queued at most once."""

    def __init__(self, name: str, on_error: Any) -> None:
        self._queue: collections.deque[RunOnNotification] = collections.deque()
        self._queued: set[int] = set()
        self._ready = threading.Condition()
        self._stopping = False
        self._on_error = on_error
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def put(self, handler: RunOnNotification) -> None:
        with self._ready:
            if id(handler) not in self._queued:
                self._queued.add(id(handler))
                self._queue.append(handler)
                self._ready.notify()

    def stop(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify_all()

    def _next(self) -> RunOnNotification | None:
        with self._ready:
            while not self._queue and not self._stopping:
                self._ready.wait()
            if self._stopping:
                return None
            handler = self._queue.popleft()
            self._queued.discard(id(handler))
            return handler

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

    listener: PgNotificationListener | None = None

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
        self._stopped = threading.Event()
        self._workers: dict[int, _Worker] = {}
        self._shared_worker = _Worker("depeche-rs-handlers", self._on_handler_error)
        self._stimulator = threading.Thread(
            target=self._stimulate, name="depeche-rs-stimulator", daemon=True
        )
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
        channel = handler.notification_channel
        self.channel_register[channel].append(handler)
        return handler

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        logger.info("received signal %s, stopping", signum)
        self.stop()

    def stop(self) -> None:
        """Stop the executor: handlers finish the message they are on, `run()` returns.

        Safe to call from a signal handler or another thread.
        """
        self.keep_running = False
        self._stopped.set()
        if self.listener is not None:
            self.listener.request_stop()
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

    def _worker_for(self, handler: RunOnNotification) -> _Worker:
        return self._workers.get(id(handler), self._shared_worker)

    def _on_handler_error(self, exc: BaseException) -> None:
        logger.error("a handler failed; stopping the executor", exc_info=exc)
        self.stop()

    def _wake_all(self) -> None:
        for handler in self._handlers():
            self._worker_for(handler).put(handler)

    def run(self) -> None:
        """Run until `stop()` (or SIGINT/SIGTERM).

        Raises:
            DatabaseConnectionError: the database could not be reached at start.
            Exception: what a handler raised (after stopping the other handlers).
        """
        from ._projector import StreamProjector

        if not self.keep_running:
            return
        for handler in self._handlers():
            # Projectors are ours and thread-safe: give each its own thread.
            if isinstance(handler, StreamProjector) and id(handler) not in self._workers:
                self._workers[id(handler)] = _Worker("depeche-rs-projector", self._on_handler_error)
        self.listener = PgNotificationListener(
            dsn=self._db_dsn,
            channels=list(self.channel_register),
            ignore_payload=False,
            on_reconnect=self._wake_all,
        )
        self.listener.start()
        workers = [self._shared_worker, *self._workers.values()]
        try:
            for worker in workers:
                worker.thread.start()
            self._stimulator.start()
            for notification in self.listener.messages():
                for handler in self.channel_register.get(notification.channel, ()):
                    if handler.interested_in_notification(notification.payload):
                        handler.take_notification_hint(notification.payload)
                        self._worker_for(handler).put(handler)
        finally:
            self.stop()
            self.listener.stop()
            for worker in workers:
                if worker.thread.is_alive():
                    worker.thread.join()
            if self._stimulator.is_alive():
                self._stimulator.join()
        for worker in workers:
            if worker.error is not None:
                raise worker.error

    def _stimulate(self) -> None:
        interval = self.stimulation_interval
        if interval is None or interval <= 0:
            return
        # depeche-db's stimulator runs every handler at once, then after each interval.
        while not self._stopped.is_set():
            self._wake_all()
            self._stopped.wait(interval)
