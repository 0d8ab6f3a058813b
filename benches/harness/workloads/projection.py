"""Workload 1: catch-up projection of a backlog, with the built-in and a Python partitioner."""

from __future__ import annotations

import time
from typing import Any

from .. import database
from ..bench import Bench, error_text
from ..figures import Figure
from ..libraries import PYTHON_FIELD, STREAM_NAME, Library

# Rows with the message time recorded at write time (depeche-rs's writer) or without it
# (depeche-db's writer: the projector then reads the time from the message body).
TIMED = "timed"
UNTIMED = "untimed"
STREAM_NAME_UNTIMED = f"{STREAM_NAME}-{UNTIMED}"
KINDS = {
    STREAM_NAME: "StreamNamePartitioner",
    PYTHON_FIELD: "Python partitioner (message field)",
    STREAM_NAME_UNTIMED: "StreamNamePartitioner, rows without a recorded message time",
}
TAGS = {STREAM_NAME: "pjs", PYTHON_FIELD: "pjp", STREAM_NAME_UNTIMED: "pju"}
# depeche-db's rows never carry a message time: the untimed case is its only case.
ONLY = {STREAM_NAME_UNTIMED: ["depeche_rs"]}
# An update that projects nothing this many times in a row means the projector is stuck.
_MAX_IDLE_UPDATES = 3


def kinds(bench: Bench) -> list[str]:
    """The kinds this run measures (`--projection-kinds`, default all)."""
    chosen = bench.settings.projection_kinds
    return [kind for kind in KINDS if not chosen or kind in chosen]


def steps(bench: Bench) -> int:
    return sum(
        bench.settings.repetitions
        * sum(1 for lib in bench.libraries if lib in ONLY.get(kind, [lib]))
        for kind in kinds(bench)
    )


def project_all(stream: Any, expected: int) -> int:
    """Call `update_full()` until the backlog is projected; return messages projected.

    depeche-db's `update_full()` runs to the end in one call; a projector that stops at a
    budget or a horizon returns `more_messages_available`, so call again until done.
    """
    total = 0
    idle = 0
    while total < expected and idle < _MAX_IDLE_UPDATES:
        result = stream.projector.update_full()
        updated = int(result[0])
        total += updated
        idle = idle + 1 if updated == 0 else 0
    return total


def projection_digest(bench: Bench, table: str) -> tuple[int, str]:
    """Row count and a digest of (message_id, partition, position) of a projected table.

    Equal digests mean two projections put every message in the same place, so their
    speeds compare like with like.
    """
    row = bench.conn.execute(
        f"SELECT count(*), md5(string_agg(message_id::text || ':' || partition || ':' "
        f"|| position, ',' ORDER BY partition, position)) FROM {table}".encode()
    ).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def measure(bench: Bench, lib: Library, kind: str, repetition: int) -> dict[str, Any]:
    settings = bench.settings
    name = bench.store_name(lib.short, TAGS[kind], repetition)
    with bench.scratch(name):
        store = lib.store(name)
        aggregated = f"{name}_a"
        partitioner = STREAM_NAME if kind == STREAM_NAME_UNTIMED else kind
        stream = lib.aggregated_stream(
            store, aggregated, partitioner, settings.projector_batch_size
        )
        database.generate_backlog(
            bench.conn,
            name,
            settings.messages,
            settings.streams,
            record_time=kind != STREAM_NAME_UNTIMED,
        )
        database.checkpoint(bench.conn)
        started = time.perf_counter()
        projected = project_all(stream, settings.messages)
        elapsed = time.perf_counter() - started
        rows, digest = projection_digest(bench, database.stream_table(aggregated))
    if rows != settings.messages:
        raise RuntimeError(f"projected {rows} rows of {settings.messages} messages")
    return {
        "messages": settings.messages,
        "projected_reported": projected,
        "rows": rows,
        "seconds": elapsed,
        "msg_per_s": settings.messages / elapsed,
        "digest": digest,
    }


def run(bench: Bench) -> list[Figure]:
    settings = bench.settings
    figures = {
        kind: Figure(
            key=f"projection/{kind}",
            label=f"catch-up projection, {label}",
            unit="msg/s",
            better="higher",
            group="projection",
            throughput=True,
            only=ONLY.get(kind, []),
            params={
                "messages": settings.messages,
                "streams": settings.streams,
                "update_batch_size": settings.projector_batch_size,
            },
        )
        for kind, label in KINDS.items()
        if kind in kinds(bench)
    }
    for repetition in range(settings.repetitions):
        for kind in figures:
            for lib in bench.order(repetition):
                figure = figures[kind]
                if not figure.measures(lib.name):
                    continue
                try:
                    with bench.progress.running(f"projection {kind} {lib.label}"):
                        detail = measure(bench, lib, kind, repetition)
                except Exception as exc:
                    figure.fail(lib.name, error_text(exc))
                    bench.progress.step(
                        f"projection {kind} {lib.label} rep {repetition + 1}: "
                        f"FAILED {error_text(exc)}"
                    )
                    continue
                figure.add(lib.name, detail["msg_per_s"], detail)
                bench.progress.step(
                    f"projection {kind} {lib.label} rep {repetition + 1}: "
                    f"{detail['msg_per_s']:,.0f} msg/s ({detail['seconds']:.1f}s)"
                )
    return list(figures.values())
