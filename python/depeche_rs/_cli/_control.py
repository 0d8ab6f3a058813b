"""The projector process's control connection: the live runtime's LISTEN connection, which
also holds the hot-standby locks and runs the small queries.

It holds one session-level advisory lock per aggregated stream this process projects: the
lock says which instance is active, and PostgreSQL releases it the moment that session
ends, however the process died, so a standby that keeps trying takes over within its poll
interval. (Correctness does not rest on it: every batch also takes the aggregated table's
lock, so two writers can never interleave even while the roles change hands.)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable

from .._runtime.live import ListenConnection
from . import _catalog


def application_name() -> str:
    """`depeche-rs project <host> <pid>`: how `status` and `pg_stat_activity` show us."""
    return f"depeche-rs project {socket.gethostname()} {os.getpid()}"[:63]


class ControlConnection(ListenConnection):
    """LISTEN on `channels` and hold the hot-standby locks, over one connection."""

    def __init__(self, dsn: str, channels: Iterable[str]) -> None:
        super().__init__(dsn, channels, application_name())

    def try_lock(self, stream: str) -> bool:
        """Take `stream`'s hot-standby lock if it is free; True when we hold it."""
        row = self.connection.execute(
            "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (_catalog.LOCK_CLASS, stream)
        ).fetchone()
        return bool(row and row[0])
