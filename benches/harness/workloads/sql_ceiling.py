"""Workload 2: the same projection as one INSERT ... SELECT inside PostgreSQL: the ceiling.

No library is involved: the backlog sits in a table shaped like depeche-db's message table
and is projected, with StreamNamePartitioner's partition numbers computed in SQL, into a
table shaped like depeche-db's aggregated table (same keys and indexes, no notify trigger).
A projector can only approach this, since it also moves the rows through a client.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from .. import database
from ..bench import Bench, error_text
from ..figures import Figure
from ..messages import STREAM_WILDCARD, stream_name
from .projection import projection_digest

SQL = "postgresql"
_TAG = "sql"

# StreamNamePartitioner: the first two bytes of sha256(stream name), little endian.
_PARTITION_SQL = (
    "get_byte(sha256(convert_to(stream, 'UTF8')), 0)"
    " + 256 * get_byte(sha256(convert_to(stream, 'UTF8')), 1)"
)


def steps(bench: Bench) -> int:
    return bench.settings.repetitions


def python_partition(stream: str) -> int:
    return int.from_bytes(hashlib.sha256(stream.encode()).digest()[:2], "little")


def create_tables(bench: Bench, store: str, aggregated: str) -> None:
    msgs = database.message_table(store)
    agg = database.stream_table(aggregated)
    # The same columns, keys and indexes as depeche-db 0.13.1 creates.
    bench.conn.execute(
        f"""
        CREATE SEQUENCE {msgs}_global_seq;
        CREATE TABLE {msgs} (
            message_id uuid PRIMARY KEY,
            global_position integer NOT NULL UNIQUE,
            added_at timestamp NOT NULL DEFAULT now(),
            stream varchar(255) NOT NULL,
            version integer NOT NULL,
            message jsonb NOT NULL,
            CONSTRAINT {msgs}_version_uq UNIQUE (stream, version)
        );
        CREATE TABLE {agg} (
            message_id uuid PRIMARY KEY,
            origin_stream varchar(255) NOT NULL,
            origin_stream_version integer NOT NULL,
            partition integer NOT NULL,
            position integer NOT NULL,
            message_occurred_at timestamp NOT NULL,
            origin_stream_global_position integer NOT NULL,
            origin_stream_added_at timestamp NOT NULL,
            CONSTRAINT {agg}_uq UNIQUE (partition, position)
        );
        CREATE INDEX ix_{agg}_partition ON {agg} (partition);
        CREATE INDEX ix_{agg}_origin_stream_global_position
            ON {agg} (origin_stream_global_position);
        CREATE TABLE {agg}_maxpos (
            partition integer PRIMARY KEY,
            max_position integer NOT NULL
        );
        """.encode()
    )


def check_partitions(bench: Bench) -> bool:
    """The SQL partition formula must give StreamNamePartitioner's numbers, or the ceiling
    would be a different projection."""
    streams = [stream_name(n) for n in (0, 1, 7, 42, 999, 123_456)]
    rows = bench.conn.execute(
        f"SELECT stream, {_PARTITION_SQL} FROM unnest(%s::text[]) AS stream".encode(),
        (streams,),
    ).fetchall()
    return all(int(part) == python_partition(stream) for stream, part in rows)


def measure(bench: Bench, repetition: int) -> dict[str, Any]:
    settings = bench.settings
    store = bench.store_name(_TAG, "ceil", repetition)
    aggregated = f"{store}_a"
    msgs = database.message_table(store)
    agg = database.stream_table(aggregated)
    with bench.scratch(store):
        create_tables(bench, store, aggregated)
        database.generate_backlog(bench.conn, store, settings.messages, settings.streams)
        projection = f"""
            INSERT INTO {agg} (message_id, origin_stream, origin_stream_version, partition,
                               position, message_occurred_at, origin_stream_global_position,
                               origin_stream_added_at)
            SELECT message_id, stream, version, partition,
                   row_number() OVER (PARTITION BY partition ORDER BY global_position) - 1,
                   (message ->> 'occurred_at')::timestamptz AT TIME ZONE 'UTC',
                   global_position, added_at
            FROM (
                SELECT *, {_PARTITION_SQL} AS partition
                FROM {msgs}
                WHERE stream LIKE %s
            ) AS src;
        """
        maxpos = f"""
            INSERT INTO {agg}_maxpos (partition, max_position)
            SELECT partition, max(position) FROM {agg} GROUP BY partition
            ON CONFLICT (partition) DO UPDATE SET max_position = excluded.max_position
        """
        started = time.perf_counter()
        with bench.conn.transaction():
            bench.conn.execute(projection.encode(), (STREAM_WILDCARD,))
            bench.conn.execute(maxpos.encode())
        elapsed = time.perf_counter() - started
        rows, digest = projection_digest(bench, agg)
    if rows != settings.messages:
        raise RuntimeError(f"projected {rows} rows of {settings.messages} messages")
    return {
        "messages": settings.messages,
        "seconds": elapsed,
        "msg_per_s": settings.messages / elapsed,
        "digest": digest,
    }


def run(bench: Bench) -> list[Figure]:
    settings = bench.settings
    figure = Figure(
        key="projection/sql-ceiling",
        label="SQL ceiling: one INSERT ... SELECT (stream-name partitions)",
        unit="msg/s",
        better="higher",
        group="projection",
        throughput=True,
        shared=True,
        params={"messages": settings.messages, "streams": settings.streams},
    )
    figure.params["partition_formula_matches_python"] = check_partitions(bench)
    for repetition in range(settings.repetitions):
        try:
            with bench.progress.running("SQL ceiling"):
                detail = measure(bench, repetition)
        except Exception as exc:
            figure.fail(SQL, error_text(exc))
            bench.progress.step(f"SQL ceiling rep {repetition + 1}: FAILED {error_text(exc)}")
            continue
        figure.add(SQL, detail["msg_per_s"], detail)
        bench.progress.step(
            f"SQL ceiling rep {repetition + 1}: {detail['msg_per_s']:,.0f} msg/s "
            f"({detail['seconds']:.2f}s)"
        )
    return [figure]


def fractions(projection: Figure, ceiling: Figure) -> Figure:
    """Each library's stream-name projection rate as a percentage of the ceiling."""
    figure = Figure(
        key="projection/fraction-of-ceiling",
        label="stream-name projection as % of SQL ceiling",
        unit="%",
        better="higher",
        group="projection",
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
