"""Turning what users pass as `engine` (a SQLAlchemy Engine or a DSN) into what we need."""

from __future__ import annotations

import collections
import contextlib
import itertools
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote as _quote
from urllib.parse import urlencode as _urlencode

import sqlalchemy as sa

from ._exceptions import DatabaseConnectionError


def to_engine(engine: Any) -> sa.Engine:
    """Return a SQLAlchemy Engine for a given Engine or DSN string."""
    if isinstance(engine, sa.Engine):
        if engine.dialect.name != "postgresql":
            raise TypeError(
                f"depeche_rs needs a PostgreSQL engine, got dialect {engine.dialect.name!r}"
            )
        return engine
    if isinstance(engine, str):
        return sa.create_engine(sqlalchemy_url(engine), pool_pre_ping=True)
    raise TypeError(
        "engine must be a SQLAlchemy Engine or a DSN string such as "
        f"'postgresql://user@host:5432/db', got {type(engine).__name__}"
    )


def sqlalchemy_url(dsn: str) -> str:
    """A psycopg-3 SQLAlchemy URL for a libpq URL (key/value DSNs are not URLs)."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if dsn.startswith(prefix):
            return "postgresql+psycopg://" + dsn[len(prefix) :]
    if dsn.startswith("postgresql+"):
        return dsn
    raise ValueError(
        f"unsupported DSN {redact(dsn)!r}: give a URL such as 'postgresql://user@host:5432/db'"
    )


def libpq_dsn(engine: sa.Engine) -> str:
    """The engine's URL in libpq form, with its password, for the Rust engine and LISTEN.

    Built by hand: SQLAlchemy writes a space in a query value as '+', which libpq and
    tokio-postgres read literally (`options=-c statement_timeout=5s` would break).
    """
    url = engine.url
    auth = ""
    if url.username:
        auth = _quote(url.username, safe="")
        if url.password is not None:
            auth += ":" + _quote(str(url.password), safe="")
        auth += "@"
    host = url.host or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    port = f":{url.port}" if url.port else ""
    database = "/" + _quote(url.database, safe="") if url.database else "/"
    query = _urlencode(
        [(k, v) for k, values in url.query.items() for v in _as_list(values)], quote_via=_quote
    )
    return f"postgresql://{auth}{host}{port}{database}" + (f"?{query}" if query else "")


def _as_list(value: str | tuple[str, ...]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def redact(dsn: str) -> str:
    """`dsn` without its password, for error messages."""
    try:
        return sa.make_url(sqlalchemy_url(dsn)).render_as_string(hide_password=True)
    except Exception:
        return "<dsn>"


def execute_script(conn: sa.Connection, script: str) -> None:
    """Run a multi-statement SQL script in `conn`'s transaction.

    It goes to the driver without parameters, so literal '%' signs in PL/pgSQL stay as
    they are; the SQLAlchemy transaction is begun first so the caller's commit covers it.
    """
    conn.exec_driver_sql("SELECT 1")
    driver = conn.connection.driver_connection
    assert driver is not None
    driver.execute(script)


@contextlib.contextmanager
def connect(engine: sa.Engine) -> Iterator[sa.Connection]:
    """`engine.connect()` that turns a failure to connect into `DatabaseConnectionError`."""
    try:
        conn = engine.connect()
    except sa.exc.OperationalError as exc:
        where = engine.url.render_as_string(hide_password=True)
        raise DatabaseConnectionError(
            f"could not connect to PostgreSQL at {where}: {exc.orig}; check the DSN and that "
            "the server is running"
        ) from exc
    with conn:
        yield conn


class ConnectionOwners:
    """Objects holding connections outside the engine's pool, closed together.

    Each registers its bound `close` method, held weakly: an object collected closes its
    connections by itself. Closing does not unregister, since our objects reopen their
    connections on next use and the next close must find them again.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._keys = itertools.count()
        self._closers: dict[int, weakref.WeakMethod[Callable[[], None]]] = {}
        # Keys of collected owners. A weakref callback runs wherever the garbage collector
        # runs, which can be inside `add` or `close_all` with `_mutex` held by the same
        # thread: the callback only appends here (atomic, no lock) and the purge happens
        # under the lock on the next call.
        self._dead: collections.deque[int] = collections.deque()

    def _purge(self) -> None:
        while self._dead:
            self._closers.pop(self._dead.popleft(), None)

    def add(self, close: Callable[[], None]) -> None:
        """Register a bound `close` method."""
        key = next(self._keys)
        dead = self._dead  # not `self`: the callback must not keep the owners alive
        ref = weakref.WeakMethod(close, lambda _: dead.append(key))
        with self._mutex:
            self._purge()
            self._closers[key] = ref

    def __len__(self) -> int:
        """How many registered owners are still alive."""
        with self._mutex:
            self._purge()
            return len(self._closers)

    def close_all(self) -> None:
        """Call every live `close`; the first error is raised after all were called."""
        with self._mutex:
            self._purge()
            refs = list(self._closers.values())
        closers = [ref() for ref in refs]
        first: Exception | None = None
        for close in closers:
            if close is None:
                continue
            try:
                close()
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first


_engine_owners: weakref.WeakKeyDictionary[sa.Engine, ConnectionOwners] = weakref.WeakKeyDictionary()
_engine_owners_mutex = threading.Lock()


def owners_of(engine: sa.Engine) -> ConnectionOwners:
    """The owners closed when `engine.dispose()` is called (one SQLAlchemy listener each)."""
    with _engine_owners_mutex:
        owners = _engine_owners.get(engine)
        if owners is None:
            owners = _engine_owners[engine] = ConnectionOwners()
            close_all = owners.close_all

            def on_dispose(_: sa.Engine) -> None:
                close_all()

            sa.event.listen(engine, "engine_disposed", on_dispose)
        return owners
