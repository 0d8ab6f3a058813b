"""PostgreSQL plumbing of the harness: DSNs, backlog generation in SQL, and cleanup.

The harness talks to PostgreSQL directly (psycopg 3, autocommit) for everything that is
not measured, so that data generation and cleanup cost the same whatever library is tested.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from .messages import STREAM_PREFIX

# Every object the harness creates has this in its name, so cleanup can find them all,
# including objects depeche-rs adds that the harness does not know about, without touching
# anything else in the database (tests of other people may share it).
NAME_MARK = "dxb_"
_SAFE_NAME = re.compile(r"[a-z0-9_]+\Z")

# Fixed origin of the generated `occurred_at` values, so every run generates equal data.
_EPOCH = "2024-01-01 00:00:00+00"


class DsnUnavailable(RuntimeError):
    """No DSN was given and no embedded server could be started."""


def resolve_dsn(given: str | None) -> tuple[str, str]:
    """Return `(dsn, where_it_came_from)` from --dsn, the environment, or an embedded server."""
    if given:
        return given, "--dsn"
    for var in ("DEPECHE_RS_BENCH_DSN", "DEPECHE_RS_TEST_DSN"):
        value = os.environ.get(var)
        if value:
            return value, var
    try:
        from depeche_rs import _embedded  # type: ignore[import-not-found, unused-ignore]

        dsn = _embedded.start_embedded()
    except Exception as exc:
        raise DsnUnavailable(
            "no database: pass --dsn postgresql://user@host:port/db or set "
            f"DEPECHE_RS_BENCH_DSN (starting an embedded server failed: {exc!r})"
        ) from exc
    return str(dsn), "embedded"


def plain_dsn(dsn: str) -> str:
    """The DSN as libpq/psycopg wants it (no SQLAlchemy driver suffix)."""
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", dsn)


def sqlalchemy_dsn(dsn: str) -> str:
    """The DSN as SQLAlchemy wants it for psycopg 3, which depeche-db needs (no psycopg2)."""
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql+psycopg://", dsn)


def connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(plain_dsn(dsn), autocommit=True)


@contextmanager
def connection(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    conn = connect(dsn)
    try:
        yield conn
    finally:
        conn.close()


def check_name(name: str) -> str:
    """Names are spliced into SQL; refuse anything that is not a plain lowercase identifier."""
    if not _SAFE_NAME.match(name):
        raise ValueError(f"unsafe object name {name!r}")
    return name


def message_table(store: str) -> str:
    return f"depeche_msgs_{check_name(store)}"


def stream_table(aggregated_stream: str) -> str:
    return f"depeche_stream_{check_name(aggregated_stream)}"


def table_columns(conn: psycopg.Connection[Any], table: str) -> set[str]:
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = %s",
        (table,),
    ).fetchall()
    return {row[0] for row in rows}


def generate_backlog(
    conn: psycopg.Connection[Any],
    store: str,
    messages: int,
    streams: int,
    chunk: int = 250_000,
    record_time: bool = True,
) -> None:
    """Append `messages` messages round-robin over `streams` streams to a store's table.

    Generated in SQL so that it costs seconds and is not measured. The data is the same in
    every call with the same sizes (ids are derived from the message number), so both
    libraries project identical rows. Columns are named explicitly because depeche-rs may
    add columns with defaults; a message-time column `occurred_at`, if present, is filled
    as depeche-rs's own writer would fill it, so its projector is not pushed onto a
    fallback path that real data would not take. `record_time=False` leaves it NULL, as
    depeche-db's writer does: the rows a migrating user has.
    """
    table = message_table(store)
    has_occurred_at = record_time and "occurred_at" in table_columns(conn, table)
    extra_col = ", occurred_at" if has_occurred_at else ""
    extra_val = ", g.ts" if has_occurred_at else ""
    # Message i (1-based) goes to stream (i-1) % streams, as version (i-1) // streams + 1:
    # streams interleave, as when many accounts are active at once.
    sql = f"""
        INSERT INTO {table} (message_id, global_position, stream, version, message{extra_col})
        SELECT g.id, nextval('{table}_global_seq'), '{STREAM_PREFIX}' || g.account,
               g.version, jsonb_build_object(
                   'event_id', g.id::text,
                   'occurred_at', to_char(g.ts AT TIME ZONE 'UTC',
                                          'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                   'account', g.account,
                   'amount', g.i %% 1000,
                   '__typename__', 'AccountCredited'){extra_val}
        FROM (
            SELECT i,
                   md5('dxb-' || i)::uuid AS id,
                   (i - 1) %% %(streams)s::bigint AS account,
                   (i - 1) / %(streams)s::bigint + 1 AS version,
                   timestamptz '{_EPOCH}' + i * interval '1 millisecond' AS ts
            FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS i
        ) AS g
        ORDER BY g.i
    """
    for first in range(1, messages + 1, chunk):
        last = min(first + chunk - 1, messages)
        conn.execute(sql.encode(), {"streams": streams, "first": first, "last": last})
    # Both libraries start from a vacuumed, analysed table: otherwise whoever reads first
    # pays for setting hint bits and may get a plan made for an empty table.
    conn.execute(f"VACUUM ANALYZE {table}".encode())


def checkpoint(conn: psycopg.Connection[Any]) -> None:
    """Start a measurement from a fresh checkpoint, so no measurement pays for flushing
    what the backlog generation dirtied and every one writes its full-page images alike.
    Skipped without the privilege (superuser or pg_checkpoint)."""
    try:
        conn.execute("CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:
        pass


def settle(conn: psycopg.Connection[Any], timeout: float = 60.0) -> None:
    """Start a live measurement on a quiet server: a fresh checkpoint (none falls due
    within a run), and no autovacuum worker still busy with what the run before left
    (depeche-db's live run ends tens of seconds behind, with tables full of dead rows).
    Waits at most `timeout` seconds for autovacuum."""
    checkpoint(conn)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
        ).fetchone()
        if not row or row[0] == 0:
            return
        time.sleep(0.5)


def drop_objects(conn: psycopg.Connection[Any], marker: str) -> int:
    """Drop every table, sequence and function whose name contains `marker`.

    `marker` always contains NAME_MARK, so only objects this harness created are touched.
    """
    if NAME_MARK not in marker:
        raise ValueError(f"refusing to drop objects not marked {NAME_MARK!r}")
    pattern = "%" + marker.replace("_", r"\_") + "%"
    dropped = 0
    tables = conn.execute(
        "SELECT c.oid::regclass::text FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p', 'v', 'm') AND c.relname LIKE %s "
        "AND n.nspname = current_schema()",
        (pattern,),
    ).fetchall()
    for (name,) in tables:
        conn.execute(f"DROP TABLE IF EXISTS {name} CASCADE".encode())
        dropped += 1
    sequences = conn.execute(
        "SELECT c.oid::regclass::text FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind = 'S' AND c.relname LIKE %s AND n.nspname = current_schema()",
        (pattern,),
    ).fetchall()
    for (name,) in sequences:
        conn.execute(f"DROP SEQUENCE IF EXISTS {name} CASCADE".encode())
        dropped += 1
    functions = conn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE p.proname LIKE %s AND n.nspname = current_schema()",
        (pattern,),
    ).fetchall()
    for (signature,) in functions:
        conn.execute(f"DROP FUNCTION IF EXISTS {signature} CASCADE".encode())
        dropped += 1
    return dropped


# Scratch databases of the held-xid workload: `dxb_idle_<pid>_<random>`.
IDLE_DATABASE_MARK = f"{NAME_MARK}idle_"


def connect_to_database(dsn: str, dbname: str, **settings: Any) -> psycopg.Connection[Any]:
    """A connection to another database of the same cluster (settings as psycopg takes)."""
    return psycopg.connect(plain_dsn(dsn), dbname=check_name(dbname), **settings)


def idle_databases(conn: psycopg.Connection[Any]) -> list[str]:
    pattern = IDLE_DATABASE_MARK.replace("_", r"\_") + "%"
    rows = conn.execute(
        "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY datname", (pattern,)
    ).fetchall()
    return [str(row[0]) for row in rows]


def drop_database(conn: psycopg.Connection[Any], dbname: str, force: bool) -> None:
    """Drop a scratch database; `force` ends its sessions first (PostgreSQL 13+)."""
    if not check_name(dbname).startswith(IDLE_DATABASE_MARK):
        raise ValueError(f"refusing to drop database {dbname!r}: not a harness scratch database")
    option = " WITH (FORCE)" if force and conn.info.server_version >= 130000 else ""
    conn.execute(f"DROP DATABASE IF EXISTS {dbname}{option}".encode())


def server_info(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """PostgreSQL version and the settings that move write and projection figures."""
    info: dict[str, Any] = {
        "version": conn.execute("SELECT version()").fetchone()[0],  # type: ignore[index]
        "server_version_num": int(
            conn.execute("SHOW server_version_num").fetchone()[0]  # type: ignore[index]
        ),
    }
    for setting in (
        "shared_buffers",
        "work_mem",
        "synchronous_commit",
        "fsync",
        "wal_level",
        "max_connections",
    ):
        info[setting] = conn.execute(f"SHOW {setting}".encode()).fetchone()[0]  # type: ignore[index]
    return info
