"""Workload 2: the same projection as one INSERT ... SELECT inside PostgreSQL: the ceiling.

The ceiling runs on the tables depeche-rs itself creates: a `MessageStore` and an
`AggregatedStream` are constructed through the library (so the message table, the
aggregated table, its indexes, its triggers and the `_maxpos` table are exactly what the
projector writes to), the backlog is generated into the store as for the projection
workload, and one statement projects it: `StreamNamePartitioner`'s partition computed in
SQL, positions continuing from `_maxpos` in global-position order within each partition,
the message time from the row's `occurred_at` (or from the message body where the writer
recorded none, as for rows written by depeche-db). Then `_maxpos` is brought up to date,
in the same transaction. Every message lands where the projector puts it (the run compares
digests of message, partition and position). A projector also moves the rows through a
client and commits in batches, so it can only approach this.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from .. import database
from ..bench import Bench, error_text
from ..figures import Figure
from ..libraries import STREAM_NAME
from ..messages import STREAM_WILDCARD, stream_name
from .projection import STREAM_NAME_UNTIMED, TIMED, UNTIMED, projection_digest

SQL = "postgresql"
# The ceiling needs the tables depeche-rs creates.
LIB = "depeche_rs"
TAGS = {TIMED: "ceil", UNTIMED: "ceilu"}
LABELS = {
    TIMED: "SQL ceiling: one INSERT ... SELECT into depeche-rs's tables (stream-name partitions)",
    UNTIMED: "SQL ceiling, rows without a recorded message time (time read from the body)",
}

# StreamNamePartitioner: the first two bytes of sha256(stream name), little endian.
_PARTITION_SQL = (
    "get_byte(sha256(convert_to(stream, 'UTF8')), 0)"
    " + 256 * get_byte(sha256(convert_to(stream, 'UTF8')), 1)"
)


def kinds(bench: Bench) -> list[str]:
    """A ceiling per stream-name projection kind the run measures (both by default)."""
    chosen = bench.settings.projection_kinds
    wanted = {TIMED: STREAM_NAME, UNTIMED: STREAM_NAME_UNTIMED}
    return [kind for kind, projection in wanted.items() if not chosen or projection in chosen]


def steps(bench: Bench) -> int:
    return len(kinds(bench)) * bench.settings.repetitions


def python_partition(stream: str) -> int:
    return int.from_bytes(hashlib.sha256(stream.encode()).digest()[:2], "little")


def check_partitions(bench: Bench) -> bool:
    """The SQL partition formula must give StreamNamePartitioner's numbers, or the ceiling
    would be a different projection."""
    streams = [stream_name(n) for n in (0, 1, 7, 42, 999, 123_456)]
    rows = bench.conn.execute(
        f"SELECT stream, {_PARTITION_SQL} FROM unnest(%s::text[]) AS stream".encode(),
        (streams,),
    ).fetchall()
    return all(int(part) == python_partition(stream) for stream, part in rows)


def projection_sql(msgs: str, agg: str) -> tuple[str, str]:
    """The ceiling's two statements: the rows, then the max positions."""
    maxpos = f"{agg}_maxpos"
    rows = f"""
        INSERT INTO {agg} (message_id, origin_stream, origin_stream_version, partition,
                           position, message_occurred_at, origin_stream_global_position,
                           origin_stream_added_at)
        SELECT src.message_id, src.stream, src.version, src.partition,
               coalesce(mp.max_position, -1)
                 + row_number() OVER (PARTITION BY src.partition ORDER BY src.global_position),
               coalesce(src.occurred_at, (src.message ->> 'occurred_at')::timestamptz)
                 AT TIME ZONE 'UTC',
               src.global_position, src.added_at
        FROM (
            SELECT h.*, get_byte(h.digest, 0) + 256 * get_byte(h.digest, 1) AS partition
            FROM (
                -- OFFSET 0 keeps the digest computed once per row, not once per use.
                SELECT m.*, sha256(convert_to(m.stream, 'UTF8')) AS digest
                FROM {msgs} AS m
                WHERE m.stream LIKE %s
                OFFSET 0
            ) AS h
        ) AS src
        LEFT JOIN {maxpos} AS mp ON mp.partition = src.partition
    """
    positions = f"""
        INSERT INTO {maxpos} (partition, max_position)
        SELECT partition, max(position) FROM {agg} GROUP BY partition
        ON CONFLICT (partition) DO UPDATE SET max_position = excluded.max_position
    """
    return rows, positions


def measure(bench: Bench, kind: str, repetition: int) -> dict[str, Any]:
    lib = bench.libraries.get(LIB)
    if lib is None:
        raise RuntimeError("the ceiling runs on the tables depeche-rs creates: load depeche_rs")
    settings = bench.settings
    store_name = bench.store_name("sql", TAGS[kind], repetition)
    aggregated = f"{store_name}_a"
    msgs = database.message_table(store_name)
    agg = database.stream_table(aggregated)
    with bench.scratch(store_name):
        # Constructing them through the library creates the library's tables, indexes and
        # triggers; the projector is never run.
        store = lib.store(store_name)
        lib.aggregated_stream(store, aggregated, STREAM_NAME, settings.projector_batch_size)
        database.generate_backlog(
            bench.conn, store_name, settings.messages, settings.streams, record_time=kind == TIMED
        )
        rows_sql, positions_sql = projection_sql(msgs, agg)
        database.checkpoint(bench.conn)
        started = time.perf_counter()
        with bench.conn.transaction():
            bench.conn.execute(rows_sql.encode(), (STREAM_WILDCARD,))
            bench.conn.execute(positions_sql.encode())
        elapsed = time.perf_counter() - started
        rows, digest = projection_digest(bench, agg)
        close = getattr(store, "close", None)
        if close is not None:
            close()
    if rows != settings.messages:
        raise RuntimeError(f"projected {rows} rows of {settings.messages} messages")
    return {
        "messages": settings.messages,
        "seconds": elapsed,
        "msg_per_s": settings.messages / elapsed,
        "digest": digest,
        "tables": "created by depeche-rs",
    }


def run(bench: Bench) -> list[Figure]:
    settings = bench.settings
    figures = {
        kind: Figure(
            key=f"projection/sql-ceiling{'' if kind == TIMED else '-untimed'}",
            label=label,
            unit="msg/s",
            better="higher",
            group="projection",
            throughput=True,
            shared=True,
            params={"messages": settings.messages, "streams": settings.streams},
        )
        for kind, label in LABELS.items()
        if kind in kinds(bench)
    }
    matches = check_partitions(bench)
    for figure in figures.values():
        figure.params["partition_formula_matches_python"] = matches
    for repetition in range(settings.repetitions):
        for kind, figure in figures.items():
            what = f"SQL ceiling ({kind})"
            try:
                with bench.progress.running(what):
                    detail = measure(bench, kind, repetition)
            except Exception as exc:
                figure.fail(SQL, error_text(exc))
                bench.progress.step(f"{what} rep {repetition + 1}: FAILED {error_text(exc)}")
                continue
            figure.add(SQL, detail["msg_per_s"], detail)
            bench.progress.step(
                f"{what} rep {repetition + 1}: {detail['msg_per_s']:,.0f} msg/s "
                f"({detail['seconds']:.2f}s)"
            )
    return list(figures.values())


def fractions(projection: Figure, ceiling: Figure) -> Figure:
    """Each library's projection rate as a percentage of the same-run ceiling."""
    untimed = ceiling.key.endswith("-untimed")
    figure = Figure(
        key="projection/fraction-of-ceiling" + ("-untimed" if untimed else ""),
        label="stream-name projection as % of SQL ceiling"
        + (", rows without message time" if untimed else ""),
        unit="%",
        better="higher",
        group="projection",
        only=list(projection.only),
        params={"definition": "median projection msg/s / median SQL ceiling msg/s * 100"},
    )
    top = ceiling.summary(SQL)
    for lib, values in projection.values.items():
        if top is None or top.median == 0:
            figure.fail(lib, "no SQL ceiling figure")
            continue
        for value in values:
            figure.add(lib, value / top.median * 100)
    for lib, error in projection.errors.items():
        figure.fail(lib, error)
    return figure
