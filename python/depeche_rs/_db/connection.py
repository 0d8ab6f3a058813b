"""Turning what users pass as `engine` (a SQLAlchemy Engine or a DSN) into what we need."""

from __future__ import annotations

import collections
import contextlib
import itertools
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .._exceptions import DatabaseConnectionError


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
    """A psycopg-3 SQLAlchemy URL for a DSN in either of libpq's forms (a URL such as
    `postgresql://user@host/db` or key/value pairs such as `host=h dbname=db`), parsed by
    libpq itself (psycopg's `conninfo`); SQLAlchemy URLs (`postgresql+driver://`) pass as
    they are."""
    if dsn.startswith("postgresql+"):
        return dsn
    if not dsn.startswith(("postgresql://", "postgres://")) and "=" not in dsn:
        scheme = dsn.partition("://")[0] if "://" in dsn else "not a URL"
        raise ValueError(
            f"unsupported DSN ({scheme}): give a URL such as 'postgresql://user@host:5432/db' "
            "or libpq key/value pairs such as 'host=localhost dbname=db'"
        )
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ValueError(f"unsupported DSN: {str(exc).strip()}") from None
    query = {k: str(v) for k, v in params.items() if v is not None}
    user, password = query.pop("user", None), query.pop("password", None)
    database = query.pop("dbname", None)
    host, port = query.get("host"), query.get("port")
    plain = (host is None or ("," not in host and not host.startswith("/"))) and (
        port is None or port.isdigit()
    )
    if plain:
        query.pop("host", None)
        query.pop("port", None)
    # Otherwise (a socket directory, several hosts or ports) they stay in the query, which
    # SQLAlchemy's psycopg dialect hands to libpq as they are.
    url = sa.URL.create(
        "postgresql+psycopg",
        username=user,
        password=password,
        host=host if plain else None,
        port=int(port) if plain and port else None,
        database=database,
        query=query,
    )
    return url.render_as_string(hide_password=False)


def libpq_conninfo(url: sa.URL) -> str:
    """A SQLAlchemy URL as a libpq key/value conninfo, with its password, for the Rust
    engine and LISTEN (psycopg's `make_conninfo` quotes what needs quoting)."""
    params = url.translate_connect_args(username="user", database="dbname")
    params.update((k, v if isinstance(v, str) else ",".join(v)) for k, v in url.query.items())
    return make_conninfo("", **params)


def libpq_dsn(engine: sa.Engine) -> str:
    """The engine's URL as libpq conninfo, with its password, for the Rust engine and LISTEN."""
    return libpq_conninfo(engine.url)


def libpq_form(dsn: str) -> str:
    """`dsn` as libpq reads it: a SQLAlchemy URL (`postgresql+psycopg://`) becomes libpq
    conninfo; libpq's own URL and key/value forms stay as they are."""
    if dsn.startswith("postgresql+"):
        return libpq_conninfo(sa.make_url(dsn))
    return dsn


def redact(dsn: str) -> str:
    """`dsn` without its password, as a libpq URL, for logs and error messages."""
    try:
        url = sa.make_url(sqlalchemy_url(dsn)).set(drivername="postgresql")
        return url.render_as_string(hide_password=True)
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
        first: Exception | None = None
        for close in filter(None, [ref() for ref in refs]):
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
            sa.event.listen(engine, "engine_disposed", lambda _: owners.close_all())
        return owners
