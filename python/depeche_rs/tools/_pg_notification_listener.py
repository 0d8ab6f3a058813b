"""LISTEN on PostgreSQL channels from a background thread, reconnecting when the
connection dies."""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql

from .._db.connection import libpq_form, redact
from .._exceptions import DatabaseConnectionError, InvalidNameError

logger = logging.getLogger("depeche_rs.listener")

# libpq keepalives, so that a connection whose peer vanished (no RST) is noticed too.
_CONNECT_OPTIONS = {
    "application_name": "depeche-rs listener",
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}
_CHANNEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")
# The longest the listener thread waits before it checks whether it should stop.
_POLL_SECONDS = 0.2
# Without traffic for this long, the listener checks its connection with a query.
_HEALTH_CHECK_SECONDS = 15.0


@dataclasses.dataclass
class PgNotification:
    """A notification received on `channel`, with its JSON payload decoded."""

    channel: str
    payload: dict[str, Any]


def _validate_channel(channel: Any) -> str:
    if not isinstance(channel, str) or not _CHANNEL.match(channel):
        raise InvalidNameError(
            f"channel name {channel!r} is not an identifier of at most 63 characters"
        )
    return channel


class PgNotificationListener:
    """Receives notifications on `channels` and hands them out through `messages()`.

    A background thread holds one connection that LISTENs on the channels. When that
    connection dies (server restart, `pg_terminate_backend`, network loss), the thread
    reconnects with exponential backoff and LISTENs again; notifications sent while it
    was away are lost, so `on_reconnect` (if given) is called after each reconnection to
    let the owner catch up (the `Executor` runs every handler then).

    Args:
        dsn: libpq DSN or URL (a SQLAlchemy `postgresql+psycopg://` URL is accepted).
        channels: Channel names to LISTEN on.
        select_timeout: Seconds `messages()` waits between checks for `stop()`.
        ignore_payload: Hand out empty payloads instead of decoding them.
        on_reconnect: Called (from the listener thread) after each reconnection.
        max_backoff: Longest pause between reconnection attempts, in seconds.
    """

    def __init__(
        self,
        dsn: str,
        channels: Sequence[str],
        select_timeout: float = 3.0,
        ignore_payload: bool = False,
        on_reconnect: Callable[[], None] | None = None,
        max_backoff: float = 5.0,
    ) -> None:
        self.dsn = libpq_form(dsn)
        self.channels = [_validate_channel(c) for c in channels]
        self._ignore_payload = ignore_payload
        self._select_timeout = select_timeout
        self._on_reconnect = on_reconnect
        self._max_backoff = max_backoff
        self._stopping = threading.Event()
        self._queue: queue.Queue[PgNotification] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self.reconnections = 0

    @property
    def running(self) -> bool:
        """True between `start()` and `stop()`."""
        return self._thread is not None and not self._stopping.is_set()

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the LISTEN connection (None while reconnecting)."""
        conn = self._conn
        return None if conn is None or conn.closed else conn.info.backend_pid

    def start(self) -> None:
        """Connect, LISTEN, and start the background thread.

        Raises:
            DatabaseConnectionError: the first connection could not be made.
        """
        if self._thread is not None:
            raise RuntimeError("PgNotificationListener.start() was already called")
        try:
            self._conn = self._connect()
        except psycopg.OperationalError as exc:
            raise DatabaseConnectionError(
                f"could not connect to PostgreSQL at {redact(self.dsn)} to LISTEN: {exc}"
            ) from exc
        self._thread = threading.Thread(target=self._run, name="depeche-rs-listener", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the thread and close the connection (waits up to `timeout` seconds)."""
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def request_stop(self) -> None:
        """Ask the thread to stop without waiting (safe in a signal handler)."""
        self._stopping.set()

    def messages(self, timeout: float = 0) -> Iterator[PgNotification]:
        """Yield notifications as they arrive, until `stop()`.

        With `timeout` > 0, also return once no notification came for that many seconds.
        """
        last = time.monotonic()
        wait = max(min(self._select_timeout / 2, 0.1), 0.01)
        while not self._stopping.is_set():
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                if timeout > 0 and time.monotonic() - last > timeout:
                    return
                continue
            yield item
            last = time.monotonic()

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.dsn, autocommit=True, **_CONNECT_OPTIONS)  # type: ignore[arg-type]
        try:
            for channel in self.channels:
                # Quoted: the triggers notify the exact name, capitals included.
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self) -> None:
        # Back-off by hand, not tenacity: three lines, a dependency for every library user
        # otherwise, and the pause must be the stop event's wait so that close() cuts it short.
        backoff = 0.05
        conn = self._conn
        try:
            while not self._stopping.is_set():
                if conn is None:
                    try:
                        conn = self._connect()
                    except psycopg.OperationalError as exc:
                        logger.warning(
                            "LISTEN connection failed (%s); retrying in %.2fs", exc, backoff
                        )
                        self._stopping.wait(backoff)
                        backoff = min(backoff * 2, self._max_backoff)
                        continue
                    self._conn = conn
                    self.reconnections += 1
                    backoff = 0.05
                    logger.info("LISTEN connection re-established on %s", self.channels)
                    if self._on_reconnect is not None:
                        try:
                            self._on_reconnect()
                        except Exception:
                            logger.exception("on_reconnect callback failed")
                try:
                    self._listen(conn)
                except psycopg.OperationalError as exc:
                    if self._stopping.is_set():
                        break
                    logger.warning("LISTEN connection lost (%s); reconnecting", exc)
                    conn.close()
                    conn = self._conn = None
        finally:
            if conn is not None:
                conn.close()
            self._conn = None

    def _listen(self, conn: psycopg.Connection[Any]) -> None:
        quiet_since = time.monotonic()
        while not self._stopping.is_set():
            got_any = False
            for notify in conn.notifies(timeout=_POLL_SECONDS):
                got_any = True
                self._queue.put(to_pg_notification(notify, self._ignore_payload))
                if self._stopping.is_set():
                    return
            now = time.monotonic()
            if got_any:
                quiet_since = now
            elif now - quiet_since > _HEALTH_CHECK_SECONDS:
                conn.execute("SELECT 1")
                quiet_since = now


def to_pg_notification(notify: psycopg.Notify, ignore_payload: bool) -> PgNotification:
    """`notify` with its JSON payload decoded (an empty payload if `ignore_payload`)."""
    if ignore_payload:
        return PgNotification(notify.channel, {})
    try:
        decoded = json.loads(notify.payload) if notify.payload else {}
    except ValueError:
        # Still a sign of activity on the channel: deliver it without hints.
        logger.warning(
            "notification on %s has a payload that is not JSON: %r",
            notify.channel,
            notify.payload[:200],
        )
        decoded = {}
    payload = decoded if isinstance(decoded, dict) else {"payload": decoded}
    return PgNotification(notify.channel, payload)
