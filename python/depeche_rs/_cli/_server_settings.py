"""PostgreSQL settings that hold a catch-up projection back, as `depeche-rs status` reports
them (docs/projector.md, "Where the time goes", has the measurements and the reasons):
`max_wal_size` when WAL volume forces checkpoints, each followed by full-page images of the
aggregated tables' index pages, and `shared_buffers` when those indexes outgrow it.
Only facts PostgreSQL reports are used; nothing is changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from .. import _names

# Warn about forced checkpoints only when there were at least this many: one forced
# checkpoint on a fresh cluster says nothing about a setting.
_MIN_FORCED_CHECKPOINTS = 3

_CHECKPOINTS_QUERY = "SELECT checkpoints_timed, checkpoints_req, stats_reset FROM pg_stat_bgwriter"
# PostgreSQL 17 moved the counters to their own view.
_CHECKPOINTS_QUERY_17 = "SELECT num_timed, num_requested, stats_reset FROM pg_stat_checkpointer"


@dataclasses.dataclass(frozen=True)
class SettingAdvice:
    """One setting that holds projection back.

    Attributes:
        setting: The PostgreSQL setting.
        value: Its current value, as `SHOW` prints it.
        finding: What was observed.
        advice: What to do about it.
    """

    setting: str
    value: str
    finding: str
    advice: str

    def describe(self) -> str:
        return f"{self.setting} = {self.value}: {self.finding}; {self.advice}"


def _show(conn: psycopg.Connection[Any], setting: str) -> str:
    row = conn.execute("SELECT current_setting(%s)", (setting,)).fetchone()
    assert row is not None
    return str(row[0])


def _checkpoints(conn: psycopg.Connection[Any]) -> SettingAdvice | None:
    modern = conn.info.server_version >= 170000
    row = conn.execute(_CHECKPOINTS_QUERY_17 if modern else _CHECKPOINTS_QUERY).fetchone()
    assert row is not None  # a view of one row
    timed, requested, reset = int(row[0]), int(row[1]), row[2]
    if requested < _MIN_FORCED_CHECKPOINTS or requested <= timed:
        return None
    since = f" since {reset:%Y-%m-%d %H:%M %Z}".rstrip() if reset is not None else ""
    return SettingAdvice(
        setting="max_wal_size",
        value=_show(conn, "max_wal_size"),
        finding=(
            f"{requested} of {requested + timed} checkpoints{since} were forced by WAL "
            "volume, and each makes the next inserts into the aggregated tables write "
            "full-page images"
        ),
        advice=(
            "raise it so checkpoints come from checkpoint_timeout "
            f"({_show(conn, 'checkpoint_timeout')}) instead, e.g. ALTER SYSTEM SET "
            "max_wal_size = '8GB'; SELECT pg_reload_conf()"
        ),
    )


def _index_bytes(conn: psycopg.Connection[Any], stream: str) -> int:
    """Bytes of the indexes every projected message writes into at random places: the
    primary key and the (partition, position) unique index of the aggregated table."""
    table = sql.Identifier(_names.stream_table(stream)).as_string(conn)
    row = conn.execute(
        "SELECT coalesce(sum(pg_relation_size(i.indexrelid)), 0)::int8 FROM pg_index AS i "
        "WHERE i.indrelid = to_regclass(%s) AND (i.indisprimary OR i.indisunique)",
        (table,),
    ).fetchone()
    return int(row[0]) if row is not None else 0


def buffers_advice(
    shared_buffers: str, buffers_bytes: int, index_bytes: dict[str, int]
) -> SettingAdvice | None:
    """Advice when the largest aggregated stream's hot indexes outgrow `shared_buffers`."""
    if not index_bytes:
        return None
    name, largest = max(index_bytes.items(), key=lambda item: (item[1], item[0]))
    if largest <= buffers_bytes:
        return None
    return SettingAdvice(
        setting="shared_buffers",
        value=shared_buffers,
        finding=(
            f"the primary key and position index of {name} take {largest / 2**20:,.0f} MB, "
            "more than the buffer cache, so catching up reads and writes back index pages "
            "instead of finding them in memory"
        ),
        advice=(
            "raise shared_buffers towards that size if the machine has the memory "
            "(it takes a restart); live projection of new messages is not affected"
        ),
    )


def _buffers(conn: psycopg.Connection[Any], streams: Sequence[str]) -> SettingAdvice | None:
    row = conn.execute(
        "SELECT setting::int8 * pg_size_bytes(coalesce(unit, '8kB')) FROM pg_settings "
        "WHERE name = 'shared_buffers'"
    ).fetchone()
    assert row is not None  # a setting every server has
    sizes = {s: _index_bytes(conn, s) for s in streams}
    return buffers_advice(_show(conn, "shared_buffers"), int(row[0]), sizes)


def advice(conn: psycopg.Connection[Any], streams: Sequence[str]) -> list[SettingAdvice]:
    """The settings that hold a catch-up projection of the aggregated `streams` back."""
    found = [_checkpoints(conn), _buffers(conn, streams)]
    return [a for a in found if a is not None]
