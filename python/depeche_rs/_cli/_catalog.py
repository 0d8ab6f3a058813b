"""What the database holds, as the commands need it: the projector registry, backlogs,
lock holders, and the stores, aggregated streams and subscription tables present.

The registry (`depeche_rs_projectors`, an additive table of ours) records, per aggregated
stream, the store, wildcards and partitioner `depeche-rs project` last ran it with: the
tables themselves do not say which origin streams an aggregated stream follows, and
`status` needs that to count the backlog. It also records why a stream is stuck (a batch
failing in a way no retry fixes), so that `status`, another process, can show it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import uuid as _uuid
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from .. import _names
from .._db.schema import lock_sql

REGISTRY_TABLE = "depeche_rs_projectors"
# The hot-standby lock is `pg_try_advisory_lock(LOCK_CLASS, hashtext(stream))`: the
# two-key form lives in a key space apart from the one-key locks used elsewhere.
LOCK_CLASS = int.from_bytes(b"dprs", "big")

Conn = psycopg.Connection[Any]


@dataclasses.dataclass(frozen=True)
class Stuck:
    """Why an aggregated stream cannot go on: its next batch fails in a way no retry
    fixes (a message the serializer cannot read, a failing partitioner, an unsafe
    sequence, tables dropped underneath).

    `kind` is the error's class name (`PoisonMessageError`, ...), `error` what is wrong and
    what to do, for people; `message_id` (with its origin stream, version and global
    position) the message the batch stopped at, when one is to blame; `since` and
    `age_seconds` when the stream got stuck, as recorded in the registry and read back.
    """

    kind: str
    error: str
    message_id: _uuid.UUID | None = None
    origin_stream: str | None = None
    version: int | None = None
    global_position: int | None = None
    since: _dt.datetime | None = None
    age_seconds: float | None = None


@dataclasses.dataclass(frozen=True)
class Registration:
    """How `depeche-rs project` last ran an aggregated stream, and whether it is stuck."""

    stream: str
    store: str
    wildcards: tuple[str, ...]
    partitioner: str
    batch_size: int
    registered_by: str
    updated_at: _dt.datetime
    stuck: Stuck | None = None


@dataclasses.dataclass(frozen=True)
class Backlog:
    """Matching messages above the projector's cursor that are not projected yet.

    With a cursor per wildcard, "above the cursor" is above the lowest cursor among the
    configured wildcards (0 for a wildcard never projected). Messages below the cursor
    whose transaction is still running are not counted: they are not visible yet.
    """

    messages: int
    oldest_written_at: _dt.datetime | None
    oldest_age_seconds: float | None


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """The session holding an aggregated stream's hot-standby lock."""

    # In the order `status --json` shows them, and `lock_holder` selects them.
    application_name: str
    pid: int
    client_addr: str | None
    since: _dt.datetime | None

    def describe(self) -> str:
        """`'depeche-rs project host 42' (server pid 1234, from 10.0.0.7)`."""
        where = f", from {self.client_addr}" if self.client_addr else ""
        name = self.application_name or "unnamed session"
        return f"{name!r} (server pid {self.pid}{where})"


def table_columns(conn: Conn, table: str) -> set[str]:
    """The column names of `table` (empty when it does not exist)."""
    rows = conn.execute(
        "SELECT attname FROM pg_attribute"
        " WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
        (table,),
    ).fetchall()
    return {r[0] for r in rows}


# Added after the first release: `ensure_registry` adds them to older tables.
_STUCK_COLUMNS = (
    ("stuck_kind", "text"),
    ("stuck_error", "text"),
    ("stuck_since", "timestamptz"),
    ("stuck_message_id", "uuid"),
    ("stuck_origin_stream", "text"),
    ("stuck_origin_version", "bigint"),
    ("stuck_global_position", "bigint"),
)


def ensure_registry(conn: Conn) -> None:
    """Create the registry table, or add the columns an older one lacks (idempotent, and
    safe when several processes start at once)."""
    present = table_columns(conn, REGISTRY_TABLE)
    if all(name in present for name, _ in _STUCK_COLUMNS):
        # The usual case takes no lock: ALTER TABLE would take an exclusive one.
        return
    with conn.transaction():
        conn.execute(lock_sql(REGISTRY_TABLE))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " stream text PRIMARY KEY,"
                " store text NOT NULL,"
                " wildcards text[] NOT NULL,"
                " partitioner text NOT NULL,"
                " batch_size integer NOT NULL,"
                " registered_by text NOT NULL,"
                " updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(sql.Identifier(REGISTRY_TABLE))
        )
        # Checked again under the lock: another process may have just added them.
        present = table_columns(conn, REGISTRY_TABLE)
        missing = [(name, kind) for name, kind in _STUCK_COLUMNS if name not in present]
        if missing:
            conn.execute(
                sql.SQL("ALTER TABLE {} {}").format(
                    sql.Identifier(REGISTRY_TABLE),
                    sql.SQL(", ").join(
                        sql.SQL("ADD COLUMN IF NOT EXISTS {} {}").format(
                            sql.Identifier(name), sql.SQL(kind)
                        )
                        for name, kind in missing
                    ),
                )
            )


_REGISTRATION_COLUMNS = (
    "stream, store, wildcards, partitioner, batch_size, registered_by, updated_at"
)
_STUCK_SELECT = (
    ", stuck_kind, stuck_error, stuck_message_id, stuck_origin_stream, stuck_origin_version,"
    " stuck_global_position, stuck_since, extract(epoch FROM now() - stuck_since)::float8"
)


def _registration(row: Sequence[Any]) -> Registration:
    # The columns of _REGISTRATION_COLUMNS, then those of _STUCK_SELECT (in Stuck's order)
    # when the registry has them.
    stuck = Stuck(row[7] or "", *row[8:]) if len(row) > 7 and row[8] is not None else None
    return Registration(row[0], row[1], tuple(row[2]), row[3], row[4], row[5], row[6], stuck)


def register(
    conn: Conn,
    stream: str,
    store: str,
    wildcards: Sequence[str],
    partitioner: str,
    batch_size: int,
    registered_by: str,
) -> Registration | None:
    """Record how `stream` is projected; returns the previous record, if any."""
    ensure_registry(conn)
    with conn.transaction():
        row = conn.execute(
            sql.SQL("SELECT {} FROM {} WHERE stream = %s FOR UPDATE").format(
                sql.SQL(_REGISTRATION_COLUMNS), sql.Identifier(REGISTRY_TABLE)
            ),
            (stream,),
        ).fetchone()
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (stream, store, wildcards, partitioner, batch_size, registered_by)"
                " VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (stream) DO UPDATE SET store = excluded.store,"
                " wildcards = excluded.wildcards, partitioner = excluded.partitioner,"
                " batch_size = excluded.batch_size, registered_by = excluded.registered_by,"
                " updated_at = now()"
            ).format(sql.Identifier(REGISTRY_TABLE)),
            (stream, store, list(wildcards), partitioner, batch_size, registered_by),
        )
    return _registration(row) if row else None


def registrations(conn: Conn) -> list[Registration]:
    """Every registered aggregated stream, by name."""
    columns = table_columns(conn, REGISTRY_TABLE)
    if not columns:
        return []
    # A registry written by an older `depeche-rs project` has no stuck columns yet
    # (`status` only reads: it does not add them).
    stuck = _STUCK_SELECT if all(name in columns for name, _ in _STUCK_COLUMNS) else ""
    rows = conn.execute(
        sql.SQL("SELECT {}{} FROM {} ORDER BY stream").format(
            sql.SQL(_REGISTRATION_COLUMNS), sql.SQL(stuck), sql.Identifier(REGISTRY_TABLE)
        )
    ).fetchall()
    return [_registration(r) for r in rows]


def mark_stuck(conn: Conn, stream: str, stuck: Stuck) -> None:
    """Record that `stream` is stuck. `stuck_since` keeps its time when the stream was
    already stuck on the same message (or the same error), as when a standby takes over
    and stops at the same place."""
    conn.execute(
        sql.SQL(
            "UPDATE {} SET"
            " stuck_since = CASE WHEN stuck_since IS NOT NULL AND stuck_kind = %(kind)s"
            "   AND (stuck_message_id = %(message_id)s::uuid"
            "        OR (%(message_id)s::uuid IS NULL AND stuck_error = %(error)s))"
            "   THEN stuck_since ELSE now() END,"
            " stuck_kind = %(kind)s, stuck_error = %(error)s,"
            " stuck_message_id = %(message_id)s::uuid,"
            " stuck_origin_stream = %(origin_stream)s,"
            " stuck_origin_version = %(version)s::int8,"
            " stuck_global_position = %(global_position)s::int8"
            " WHERE stream = %(stream)s"
        ).format(sql.Identifier(REGISTRY_TABLE)),
        {**dataclasses.asdict(stuck), "stream": stream},
    )


def clear_stuck(conn: Conn, stream: str) -> bool:
    """Record that `stream` projects again; True when it was recorded as stuck."""
    cleared = conn.execute(
        sql.SQL(
            "UPDATE {} SET stuck_kind = NULL, stuck_error = NULL, stuck_since = NULL,"
            " stuck_message_id = NULL, stuck_origin_stream = NULL, stuck_origin_version = NULL,"
            " stuck_global_position = NULL"
            " WHERE stream = %s AND (stuck_error IS NOT NULL OR stuck_since IS NOT NULL)"
        ).format(sql.Identifier(REGISTRY_TABLE)),
        (stream,),
    )
    return cleared.rowcount > 0


def locate_message(conn: Conn, store: str, message_id: _uuid.UUID) -> tuple[str, int, int] | None:
    """Origin stream, version and global position of a stored message, if it exists."""
    row = conn.execute(
        sql.SQL("SELECT stream, version, global_position FROM {} WHERE message_id = %s").format(
            sql.Identifier(_names.message_table(store))
        ),
        (message_id,),
    ).fetchone()
    return (str(row[0]), int(row[1]), int(row[2])) if row else None


def _cursor_position(conn: Conn, stream: str) -> sql.Composable:
    """SQL for the global position the backlog is counted from, in every layout of the
    cursor table (parameter: the wildcards)."""
    cursor = _names.cursor_table(stream)
    columns = table_columns(conn, cursor)
    if "wildcard" in columns:
        # One row per wildcard: count from the lowest cursor among the configured
        # wildcards; a wildcard without a row (never projected) is at 0.
        return sql.SQL(
            "(SELECT coalesce(min(coalesce(c.global_position, 0)), 0)"
            " FROM unnest(%(wildcards)s::text[]) AS w(wildcard)"
            " LEFT JOIN {} AS c ON c.wildcard = w.wildcard)"
        ).format(sql.Identifier(cursor))
    if "id" in columns:
        # One row for all wildcards (before cursors were kept per wildcard).
        return sql.SQL("coalesce((SELECT global_position FROM {} WHERE id = 1), 0)").format(
            sql.Identifier(cursor)
        )
    # Without our cursor table (a depeche-db layout not migrated yet) every matching
    # message is checked against the aggregated table.
    return sql.SQL("0")


def backlog(conn: Conn, store: str, stream: str, wildcards: Sequence[str]) -> Backlog:
    """Count the backlog of `stream` (see `Backlog`)."""
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), min(m.added_at),"
            " extract(epoch FROM localtimestamp - min(m.added_at))::float8"
            " FROM {msgs} AS m"
            " WHERE m.global_position > {above} AND m.stream LIKE ANY(%(wildcards)s)"
            " AND NOT EXISTS (SELECT 1 FROM {agg} AS a WHERE a.message_id = m.message_id)"
        ).format(
            msgs=sql.Identifier(_names.message_table(store)),
            agg=sql.Identifier(_names.stream_table(stream)),
            above=_cursor_position(conn, stream),
        ),
        {"wildcards": list(wildcards)},
    ).fetchone()
    assert row is not None
    return Backlog(messages=int(row[0]), oldest_written_at=row[1], oldest_age_seconds=row[2])


def lock_holder(conn: Conn, stream: str) -> LockHolder | None:
    """The session holding `stream`'s hot-standby lock, if any."""
    row = conn.execute(
        "SELECT coalesce(a.application_name, ''), l.pid, host(a.client_addr), a.backend_start"
        " FROM pg_locks AS l LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
        "   AND l.classid = %s::int4::oid AND l.objid = hashtext(%s)::oid"
        "   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " LIMIT 1",
        (LOCK_CLASS, stream),
    ).fetchone()
    return LockHolder(*row) if row else None


def _tables_with_columns(conn: Conn, prefix: str, *columns: str) -> list[str]:
    """Tables named `<prefix><identifier>` that have every one of `columns`: other tables
    under the same prefix (depeche-db 0.14's `_omax` and `_meta`, our `_cursor`) are not
    what the caller looks for, and must not take a command down."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_class AS c"
        " WHERE c.relkind IN ('r', 'p') AND c.relname LIKE %s AND pg_table_is_visible(c.oid)"
        "   AND (SELECT count(*) FROM pg_attribute AS a WHERE a.attrelid = c.oid"
        "        AND a.attname = ANY(%s) AND NOT a.attisdropped) = %s"
        " ORDER BY c.relname",
        (prefix.replace("_", "\\_") + "%", list(columns), len(columns)),
    ).fetchall()
    names = [r[0][len(prefix) :] for r in rows]
    # Names end up in further queries (quoted), but only identifiers are ours to read.
    return [n for n in names if _names.is_name(n)]


def aggregated_streams(conn: Conn) -> list[str]:
    """Names of the aggregated streams present (tables with their columns)."""
    return _tables_with_columns(
        conn, _names.stream_table(""), "message_id", "origin_stream", "partition", "position"
    )


def stores(conn: Conn) -> list[str]:
    """Names of the message stores present."""
    return _tables_with_columns(
        conn, _names.message_table(""), "message_id", "stream", "version", "global_position"
    )


def subscription_tables(conn: Conn) -> list[str]:
    """Names of the subscription state tables present (without the prefix)."""
    return _tables_with_columns(
        conn, _names.subscription_table(""), "subscription_name", "partition", "position"
    )


def store_of(conn: Conn, stream: str, candidates: Sequence[str]) -> str | None:
    """The store among `candidates` whose messages `stream` aggregates (None if empty)."""
    row = conn.execute(
        sql.SQL("SELECT message_id FROM {} LIMIT 1").format(
            sql.Identifier(_names.stream_table(stream))
        )
    ).fetchone()
    if row is None:
        return None
    for store in candidates:
        found = conn.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE message_id = %s)").format(
                sql.Identifier(_names.message_table(store))
            ),
            (row[0],),
        ).fetchone()
        if found and found[0]:
            return store
    return None


def max_positions(conn: Conn, stream: str) -> dict[int, int]:
    """Partition -> highest position of `stream`."""
    maxpos = _names.maxpos_table(stream)
    if table_columns(conn, maxpos):
        query = sql.SQL("SELECT partition, max_position FROM {}").format(sql.Identifier(maxpos))
    else:  # depeche-db before 0.12.3
        query = sql.SQL("SELECT partition, max(position) FROM {} GROUP BY partition").format(
            sql.Identifier(_names.stream_table(stream))
        )
    return {int(p): int(m) for p, m in conn.execute(query).fetchall()}


def subscription_states(conn: Conn, table: str) -> dict[str, dict[int, int]]:
    """Subscription name -> partition -> last acknowledged position, from one state table.

    depeche-db's "initialized" marker (partition -1) is left out; a subscription with
    only that marker maps to an empty dict.
    """
    rows = conn.execute(
        sql.SQL("SELECT subscription_name, partition, position FROM {}").format(
            sql.Identifier(_names.subscription_table(table))
        )
    ).fetchall()
    states: dict[str, dict[int, int]] = {}
    for name, partition, position in rows:
        positions = states.setdefault(str(name), {})
        if partition >= 0:
            positions[int(partition)] = int(position)
    return states
