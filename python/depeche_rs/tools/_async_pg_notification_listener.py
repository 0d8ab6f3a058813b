"""LISTEN on PostgreSQL channels from asyncio, on psycopg's AsyncConnection."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql

from .._db.connection import libpq_form, redact
from .._exceptions import DatabaseConnectionError
from ._pg_notification_listener import (
    PgNotification,
    _validate_channel,
    to_pg_notification,
)

logger = logging.getLogger("depeche_rs.listener")

# Longest pause between reconnection attempts after the connection died.
_MAX_BACKOFF_SECONDS = 5.0


class AsyncPgNotificationListener:
    """Receives notifications on `channels` in asyncio code (depeche-db's async listener).

    One `psycopg.AsyncConnection` LISTENs on the channels; `messages()` yields each
    notification as it arrives. A connection that dies is reopened (with backoff) and
    LISTENs again; notifications sent while it was away are lost, as with any LISTEN.

    Args:
        dsn: libpq DSN or URL (a SQLAlchemy `postgresql+psycopg://` URL is accepted).
        channels: Channel names to LISTEN on.
        select_timeout: Seconds `messages()` waits between checks for `stop()`.
        ignore_payload: Hand out empty payloads instead of decoding them.
    """

    def __init__(
        self,
        dsn: str,
        channels: Sequence[str],
        select_timeout: float = 3.0,
        ignore_payload: bool = False,
    ) -> None:
        self.dsn = libpq_form(dsn)
        self.channels = [_validate_channel(c) for c in channels]
        self._select_timeout = select_timeout
        self._ignore_payload = ignore_payload
        self._keep_running = True
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def start(self) -> None:
        """Connect and LISTEN.

        Raises:
            DatabaseConnectionError: the connection could not be made.
        """
        self._keep_running = True
        try:
            self._conn = await self._connect()
        except psycopg.OperationalError as exc:
            raise DatabaseConnectionError(
                f"could not connect to PostgreSQL at {redact(self.dsn)} to LISTEN: {exc}"
            ) from exc

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        try:
            for channel in self.channels:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            await conn.close()
            raise
        return conn

    async def messages(self, timeout: float = 0) -> AsyncIterator[PgNotification]:
        """Yield notifications as they arrive, until `stop()`.

        With `timeout` > 0, also return once no notification came for that many seconds.
        """
        if self._conn is None:
            await self.start()
        last = time.monotonic()
        # Back-off by hand, not tenacity: three lines, against a dependency for every user.
        backoff = 0.05
        while self._keep_running:
            wait = self._select_timeout
            if timeout > 0:
                wait = min(wait, max(timeout - (time.monotonic() - last), 0.0))
            try:
                conn = self._conn or await self._connect()
                self._conn = conn
                async for notify in conn.notifies(timeout=max(wait, 0.01)):
                    yield to_pg_notification(notify, self._ignore_payload)
                    last = time.monotonic()
                    if not self._keep_running:
                        return
                backoff = 0.05
            except psycopg.OperationalError as exc:
                if not self._keep_running:
                    return
                logger.warning("LISTEN connection lost (%s); reconnecting", exc)
                await self._close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
            if timeout > 0 and time.monotonic() - last >= timeout:
                return

    async def stop(self) -> None:
        """Stop `messages()` and close the connection."""
        self._keep_running = False
        await self._close()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def __aenter__(self) -> AsyncPgNotificationListener:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
