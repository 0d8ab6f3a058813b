"""`ThreadedExecutor`: depeche-db's experimental executor that gives every handler a thread.

Same contract as `depeche_rs.Executor` (a handler runs when a notification on its channel
interests it and every `stimulation_interval` seconds, and again while it reports
`WORK_REMAINING`), except that each registered handler runs on a thread of its own, so
slow subscription handlers do not hold each other up. As in depeche-db, a handler that
raises stops the executor, and `run()` logs the failure (kept in `failed_handlers`)
instead of raising it.
"""

from __future__ import annotations

import collections
import logging
import signal
import threading
from collections.abc import Iterable
from types import FrameType

from .._db.connection import libpq_form
from .._interfaces import RunOnNotification
from .._runtime.executor import _Worker
from ..tools._pg_notification_listener import PgNotificationListener

logger = logging.getLogger("depeche_rs.threaded_executor")


class ThreadedExecutor:
    """Runs registered handlers (`RunOnNotification`), each on its own thread.

    Args:
        db_dsn: DSN of the PostgreSQL database (libpq URL; `postgresql+psycopg://` is
            accepted).
        stimulation_interval: Every this many seconds, the first time when `run()` starts,
            every handler runs once whether notified or not; zero, negative or None
            disables it.
        disable_signals: Do not install SIGINT/SIGTERM handlers (needed to construct the
            executor outside the main thread); stop it with `stop()`.
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
        self.failed_handlers: dict[int, BaseException] = {}
        self._stopped = threading.Event()
        self._workers: dict[int, _Worker] = {}
        self._stimulator = threading.Thread(
            target=self._stimulate, name="depeche-rs-stimulator", daemon=True
        )
        if not disable_signals:
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
        """Stop the executor: handlers finish what they are on, `run()` returns."""
        self.keep_running = False
        self._stopped.set()
        if self.listener is not None:
            self.listener.request_stop()
        for handler in self._handlers():
            handler.stop()
        for worker in list(self._workers.values()):
            worker.stop()

    # depeche-db's name.
    _stop = stop

    def _handlers(self) -> Iterable[RunOnNotification]:
        for handlers in list(self.channel_register.values()):
            yield from handlers

    def _wake_all(self) -> None:
        for handler in self._handlers():
            self._workers[id(handler)].put(handler)

    def _worker(self, handler: RunOnNotification) -> _Worker:
        def on_error(exc: BaseException) -> None:
            self.failed_handlers[id(handler)] = exc
            self.stop()

        return _Worker(f"depeche-rs-handler-{len(self._workers)}", on_error)

    def run(self) -> None:
        """Run until `stop()` (or SIGINT/SIGTERM); a failed handler is logged, not raised.

        Raises:
            DatabaseConnectionError: the database could not be reached at start.
        """
        if not self.keep_running:
            return
        for handler in self._handlers():
            self._workers.setdefault(id(handler), self._worker(handler))
        self.listener = PgNotificationListener(
            dsn=self._db_dsn,
            channels=list(self.channel_register),
            ignore_payload=False,
            on_reconnect=self._wake_all,
        )
        self.listener.start()
        workers = list(self._workers.values())
        try:
            for worker in workers:
                worker.thread.start()
            self._stimulator.start()
            for notification in self.listener.messages():
                for handler in self.channel_register.get(notification.channel, ()):
                    if handler.interested_in_notification(notification.payload):
                        handler.take_notification_hint(notification.payload)
                        self._workers[id(handler)].put(handler)
        finally:
            self.stop()
            self.listener.stop()
            for worker in workers:
                if worker.thread.is_alive():
                    worker.thread.join()
            if self._stimulator.is_alive():
                self._stimulator.join()
        for handler_id, exc in list(self.failed_handlers.items()):
            logger.error("handler %s failed", handler_id, exc_info=exc)

    def _stimulate(self) -> None:
        interval = self.stimulation_interval
        if interval is None or interval <= 0:
            return
        while not self._stopped.is_set():
            self._wake_all()
            self._stopped.wait(interval)
