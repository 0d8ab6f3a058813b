"""The projector process's control connection: LISTEN, the hot-standby locks, small queries.

One autocommit psycopg connection per process. It LISTENs on the stores' channels, and
holds one session-level advisory lock per aggregated stream this process projects: the
lock says which instance is active, and PostgreSQL releases it the moment that session
ends, however the process died, so a standby that keeps trying takes over within its poll
interval. (Correctness does not rest on it: every batch also takes the aggregated table's
lock, so two writers can never interleave even while the roles change hands.)
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg import sql

from . import _catalog


# By hand, not tenacity/backoff: they wrap a blocking call in a retry loop, while the projector's
# loop only needs the next delay, to schedule each stream's retry as one deadline among others.
class Backoff:
    """Exponential backoff with jitter: 0.5 s, 1 s, 2 s, ... up to `maximum`."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempts = 0

    def next_delay(self) -> float:
        """The pause before the next attempt."""
        base = min(self.maximum, self.initial * 2**self.attempts)
        self.attempts += 1
        # +-20 %, so that instances cut off together do not reconnect in lockstep.
        return float(base * random.uniform(0.8, 1.2))

    def reset(self) -> None:
        """Back to the first delay after a success."""
        self.attempts = 0


def application_name() -> str:
    """`depeche-rs project <host> <pid>`: how `status` and `pg_stat_activity` show us."""
    return f"depeche-rs project {socket.gethostname()} {os.getpid()}"[:63]


class ControlConnection:
    """LISTEN on `channels` and hold the hot-standby locks, over one connection."""

    def __init__(self, dsn: str, channels: Iterable[str]) -> None:
        self.dsn = dsn
        self.channels = sorted(set(channels))
        self.name = application_name()
        self._conn: psycopg.Connection[Any] | None = None

    @property
    def up(self) -> bool:
        """True while the connection is open (as far as we know)."""
        return self._conn is not None and not self._conn.closed

    @property
    def backend_pid(self) -> int | None:
        """The server process of the connection."""
        return self._conn.info.backend_pid if self._conn is not None else None

    def connect(self) -> None:
        """Open the connection and LISTEN (raises `psycopg.Error`)."""
        self.close()
        conn = psycopg.connect(
            self.dsn,
            autocommit=True,
            application_name=self.name,
            # libpq keepalives, so that a peer that vanished without a RST is noticed too.
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
        try:
            # The server's side of the same: a host that vanished must not hold the
            # hot-standby lock until the kernel's default keepalive (2 hours) gives up.
            conn.execute(
                "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; "
                "SET tcp_keepalives_count = 3"
            )
            for channel in self.channels:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def close(self) -> None:
        """Close the connection; its locks are released by the server."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    @property
    def connection(self) -> psycopg.Connection[Any]:
        """The open connection (raises `psycopg.OperationalError` when there is none)."""
        if self._conn is None or self._conn.closed:
            raise psycopg.OperationalError("the control connection is closed")
        return self._conn

    def try_lock(self, stream: str) -> bool:
        """Take `stream`'s hot-standby lock if it is free; True when we hold it."""
        row = self.connection.execute(
            "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (_catalog.LOCK_CLASS, stream)
        ).fetchone()
        return bool(row and row[0])

    def unlock(self, stream: str) -> None:
        """Release `stream`'s hot-standby lock."""
        self.connection.execute(
            "SELECT pg_advisory_unlock(%s, hashtext(%s))", (_catalog.LOCK_CLASS, stream)
        )

    def wait(self, timeout: float) -> list[psycopg.Notify]:
        """Notifications received within `timeout` seconds (returns at the first one)."""
        conn = self.connection
        received = list(conn.notifies(timeout=max(0.0, timeout), stop_after=1))
        if received:
            # Drain what else is already queued, without waiting.
            received.extend(conn.notifies(timeout=0))
        return received
