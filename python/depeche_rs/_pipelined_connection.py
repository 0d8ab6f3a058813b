"""One PostgreSQL connection in libpq pipeline mode, for the subscription hot path.

Statements are sent without waiting for earlier ones to finish, and each one is followed
by a Sync, so each runs in its own implicit transaction and commits on its own. The
server executes them in the order sent, which is what the subscription relies on: an
acknowledgement queued before an unlock is committed before the lock is released, and a
read queued after a lock sees everything committed before the lock was granted.

A subscription acknowledging message after message therefore never waits for a round
trip: it waits only when it needs rows back (the next batch).
"""

from __future__ import annotations

import collections
import select
import threading
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import pq
from psycopg.adapt import Transformer

from ._exceptions import DatabaseConnectionError

_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_PIPELINE_SYNC = pq.ExecStatus.PIPELINE_SYNC
_FATAL_ERROR = pq.ExecStatus.FATAL_ERROR
_PIPELINE_ABORTED = pq.ExecStatus.PIPELINE_ABORTED

Param = int | str | bytes | None

# SQLSTATE classes 08 (connection exception) and 57 (operator intervention).
_SESSION_ENDED = ("08", "57")


class Pending:
    """The outcome of one statement sent through a `PipelinedConnection`."""

    __slots__ = ("done", "error", "rows", "want_rows")

    def __init__(self, want_rows: bool) -> None:
        self.want_rows = want_rows
        self.done = False
        self.rows: list[tuple[Any, ...]] = []
        self.error: Exception | None = None


def _encode(value: Param) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, int):
        return str(value).encode()
    return value.encode()


class PipelinedConnection:
    """A connection whose statements are pipelined, each in its own transaction.

    Not thread-safe: one thread uses it at a time. After any error the connection must be
    closed (`close`), which also releases the session-level advisory locks it holds.
    """

    def __init__(self, dsn: str, setup: Sequence[str] = ()) -> None:
        try:
            self._conn = psycopg.connect(dsn, autocommit=True)
        except psycopg.OperationalError as exc:
            raise DatabaseConnectionError(
                f"could not connect to PostgreSQL for the subscription: {exc}; check the DSN "
                "and that the server is running"
            ) from exc
        try:
            for statement in setup:
                self._conn.execute(statement.encode())
        except BaseException:
            self._conn.close()
            raise
        self._pg = self._conn.pgconn
        self._encoding = self._conn.info.encoding
        self._tx = Transformer(self._conn)
        self._prepared: set[bytes] = set()
        # One entry per statement or Sync sent whose results have not been read yet.
        self._queue: collections.deque[Pending | None] = collections.deque()
        # Errors of statements nobody waits for (fire-and-forget acknowledgements).
        self._orphan_error: Exception | None = None
        self._results: list[pq.abc.PGresult] = []
        self._pg.nonblocking = 1
        self._pg.enter_pipeline_mode()
        self.closed = False

    def send(
        self, name: bytes, sql: str, params: Sequence[Param], want_rows: bool = False
    ) -> Pending:
        """Queue a statement (prepared once under `name`) followed by a Sync."""
        if self.closed:
            raise DatabaseConnectionError("the subscription connection is closed")
        try:
            if name not in self._prepared:
                self._pg.send_prepare(name, sql.encode())
                self._pg.pipeline_sync()
                self._queue.append(Pending(False))
                self._queue.append(None)
                self._prepared.add(name)
            self._pg.send_query_prepared(name, [_encode(p) for p in params])
            self._pg.pipeline_sync()
            pending = Pending(want_rows)
            self._queue.append(pending)
            self._queue.append(None)
            self._pg.flush()
        except psycopg.OperationalError as exc:
            raise self._broken(exc) from exc
        return pending

    def poll(self) -> None:
        """Read whatever results have arrived, without blocking."""
        if self._queue and not self.closed:
            try:
                self._pg.flush()
                self._drain_input()
                self._read_available()
            except psycopg.OperationalError as exc:
                raise self._broken(exc) from exc
        self._raise_orphan_error()

    def check(self) -> None:
        """Raise `DatabaseConnectionError` if the server ended the session, without
        blocking (also with nothing in flight)."""
        if self.closed:
            raise DatabaseConnectionError("the subscription connection is closed")
        try:
            self._pg.flush()
            self._drain_input()
            self._read_available()
        except psycopg.OperationalError as exc:
            raise self._broken(exc) from exc
        self._raise_orphan_error()

    def _drain_input(self) -> None:
        # Read until the socket has nothing more: a server ending the session sends a
        # FATAL error, then closes; only reading the end of the stream (a further read,
        # with TLS a record at a time) makes libpq mark the connection bad.
        pg = self._pg
        sock = pg.socket
        while True:
            pg.consume_input()
            if not select.select([sock], [], [], 0)[0]:
                return

    def wait(self, pending: Pending) -> list[tuple[Any, ...]]:
        """Block until `pending` is done; return its rows or raise its error."""
        self._wait_until(lambda: pending.done)
        # An earlier fire-and-forget statement's error is the likelier root cause.
        self._raise_orphan_error()
        if pending.error is not None:
            self._raise(pending.error)
        return pending.rows

    def wait_all(self) -> None:
        """Block until every statement sent so far is done; raise the first error."""
        self._wait_until(lambda: not self._queue)
        self._raise_orphan_error()

    def close(self) -> None:
        """Close the connection (releasing its advisory locks)."""
        if not self.closed:
            self.closed = True
            self._conn.close()

    def _raise_orphan_error(self) -> None:
        if self._orphan_error is not None:
            error, self._orphan_error = self._orphan_error, None
            self._raise(error)

    def _raise(self, error: Exception) -> None:
        # The server ending the session (shutdown, pg_terminate_backend) arrives as an
        # error result first: report it as the lost connection it is.
        sqlstate = getattr(error, "sqlstate", None) or ""
        if self._pg.status == pq.ConnStatus.BAD or sqlstate[:2] in _SESSION_ENDED:
            raise self._broken(error) from error
        raise error

    def _broken(self, exc: Exception) -> DatabaseConnectionError:
        self.close()
        return DatabaseConnectionError(f"lost the subscription's database connection: {exc}")

    def _wait_until(self, condition: Any) -> None:
        try:
            while not condition():
                if self.closed:
                    raise DatabaseConnectionError("the subscription connection is closed")
                wants_write = self._pg.flush() == 1
                sock = self._pg.socket
                readable, _, _ = select.select([sock], [sock] if wants_write else [], [], 1.0)
                if readable:
                    self._pg.consume_input()
                    self._read_available()
        except psycopg.OperationalError as exc:
            raise self._broken(exc) from exc

    def _read_available(self) -> None:
        self._read_results()
        if self._pg.status == pq.ConnStatus.BAD:
            # libpq ends a dead connection's pending statements without results.
            message = self._pg.get_error_message(self._encoding) or "connection lost"
            raise psycopg.OperationalError(message)

    def _read_results(self) -> None:
        pg = self._pg
        queue = self._queue
        while queue and not pg.is_busy():
            head = queue[0]
            result = pg.get_result()
            if head is None:
                # Expecting the Sync that closes a statement's implicit transaction.
                if result is None:
                    break
                if result.status != _PIPELINE_SYNC:
                    raise DatabaseConnectionError(
                        "unexpected result in the subscription pipeline: "
                        f"{pq.ExecStatus(result.status).name}"
                    )
                queue.popleft()
            elif result is None:
                # NULL ends the results of the statement at the head of the queue.
                self._finish(head)
            else:
                self._results.append(result)

    def _finish(self, pending: Pending) -> None:
        self._queue.popleft()
        results, self._results = self._results, []
        for result in results:
            status = result.status
            if status == _FATAL_ERROR:
                pending.error = psycopg.errors.error_from_result(result, encoding=self._encoding)
            elif status == _PIPELINE_ABORTED:
                pending.error = pending.error or psycopg.errors.PipelineAborted(
                    "statement skipped after an earlier error in the pipeline"
                )
            elif status == _TUPLES_OK and pending.want_rows:
                self._tx.set_pgresult(result)
                pending.rows = self._tx.load_rows(0, result.ntuples, tuple)
                self._tx.set_pgresult(None)
        pending.done = True
        if pending.error is not None and not pending.want_rows and self._orphan_error is None:
            self._orphan_error = pending.error


class ConnectionPool:
    """Pipelined connections for the threads of one subscription: a thread takes one,
    uses it alone, and gives it back."""

    def __init__(self, dsn: str, setup: Sequence[str]) -> None:
        self._dsn = dsn
        self._setup = list(setup)
        self._mutex = threading.Lock()
        self._idle: list[PipelinedConnection] = []
        self._open: set[PipelinedConnection] = set()

    def take(self) -> PipelinedConnection:
        """An idle connection, or a new one."""
        with self._mutex:
            if self._idle:
                return self._idle.pop()
        connection = PipelinedConnection(self._dsn, self._setup)
        with self._mutex:
            self._open.add(connection)
        return connection

    def give_back(self, connection: PipelinedConnection) -> None:
        """Return a connection taken with `take` (a closed one is dropped)."""
        with self._mutex:
            if connection.closed:
                self._open.discard(connection)
            else:
                self._idle.append(connection)

    def discard(self, connection: PipelinedConnection) -> None:
        """Close and drop a connection taken with `take`."""
        connection.close()
        with self._mutex:
            self._open.discard(connection)

    def wait_all(self) -> None:
        """Wait until everything sent on idle connections is done."""
        with self._mutex:
            idle = list(self._idle)
        for connection in idle:
            if not connection.closed:
                connection.wait_all()

    def close(self) -> None:
        """Close every connection, idle or taken."""
        with self._mutex:
            connections = list(self._open)
            self._open.clear()
            self._idle.clear()
        for connection in connections:
            connection.close()
