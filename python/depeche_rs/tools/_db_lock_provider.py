"""Named, non-blocking locks held as PostgreSQL session-level advisory locks."""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any

import psycopg

from .._db.connection import libpq_dsn, owners_of, to_engine
from .._exceptions import DatabaseConnectionError
from .._names import validate_name

logger = logging.getLogger("depeche_rs.locks")


def advisory_lock_key(app_name: str, lock_name: str) -> int:
    """The bigint advisory lock key of `lock_name` in namespace `app_name`.

    The same number depeche-db's lock provider (the `pals` library) uses: the first eight
    bytes of sha1("<app_name>.<lock_name>") as a little-endian signed integer, so a
    depeche-db consumer and a depeche-rs consumer of one subscription exclude each other.
    """
    digest = hashlib.sha1(f"{app_name}.{lock_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


class DbLockProvider:
    """Non-blocking named locks shared by all processes using the same database.

    Each lock is a session-level `pg_try_advisory_lock` on one dedicated connection of
    this provider; a lock is also refused when it is already held through this provider,
    so two threads of one process exclude each other as two processes do. If the
    connection is lost, PostgreSQL releases its locks; the provider reconnects on the
    next `lock` call.

    Subscriptions created with this provider (the default) take their partition locks on
    their own reading connection with the same keys, so the lock costs no extra round
    trip.

    Args:
        name: Namespace of the lock names (depeche-db uses the subscription name).
        engine: SQLAlchemy Engine or DSN of the database holding the locks.
    """

    def __init__(self, name: str, engine: Any) -> None:
        self.name = validate_name(name, "lock provider name")
        self._engine = to_engine(engine)
        self._dsn = libpq_dsn(self._engine)
        self._mutex = threading.Lock()
        # Locks held on this provider's connection, and names claimed by subscriptions
        # that hold the advisory lock on their own connection.
        self._held: set[str] = set()
        self._claims: set[str] = set()
        self._conn: psycopg.Connection[Any] | None = None
        owners_of(self._engine).add(self.close)

    @property
    def dsn(self) -> str:
        """The libpq DSN of the database holding the locks."""
        return self._dsn

    def key(self, name: str) -> int:
        """The advisory lock key of lock `name`."""
        return advisory_lock_key(self.name, name)

    def claim(self, name: str) -> bool:
        """Mark `name` as held in this process, without touching the database.

        Used by subscriptions that take the advisory lock on their own connection;
        returns False if `name` is already held through this provider.
        """
        with self._mutex:
            if name in self._held or name in self._claims:
                return False
            self._claims.add(name)
            return True

    def release_claim(self, name: str) -> None:
        """Undo `claim`."""
        with self._mutex:
            self._claims.discard(name)

    def lock(self, name: str) -> bool:
        """Try to lock `name`; return True when locked. Never blocks on another holder."""
        with self._mutex:
            if name in self._held or name in self._claims:
                return False
            conn = self._connection()
            try:
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key(name),)).fetchone()
            except psycopg.OperationalError:
                # The connection died, and with it every lock it held: forget them all.
                self._drop_connection()
                conn = self._connection()
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key(name),)).fetchone()
            locked = bool(row and row[0])
            if locked:
                self._held.add(name)
            return locked

    def unlock(self, name: str) -> None:
        """Release the lock on `name` (a no-op if it is not held)."""
        with self._mutex:
            if name not in self._held:
                return
            self._held.discard(name)
            if self._conn is None:
                return
            try:
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (self.key(name),))
            except psycopg.OperationalError:
                logger.warning("lost the lock connection while unlocking %r", name)
                self._drop_connection()

    def finalize(self) -> None:
        """Close the connection, releasing every lock still held."""
        with self._mutex:
            self._drop_connection()

    close = finalize

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = psycopg.connect(self._dsn, autocommit=True)
            except psycopg.OperationalError as exc:
                raise DatabaseConnectionError(
                    f"could not connect to PostgreSQL for locks: {exc}; check the DSN and "
                    "that the server is running"
                ) from exc
        return self._conn

    def _drop_connection(self) -> None:
        self._held.clear()
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def __del__(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()
