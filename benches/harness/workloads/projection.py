"""Workload 1: catch-up projection of a backlog, with the built-in and a Python partitioner."""

from __future__ import annotations

import time
from typing import Any

from .. import database
from ..bench import Bench, error_text
from ..figures import Figure
from ..libraries import PYTHON_FIELD, STREAM_NAME, Library

KINDS = {STREAM_NAME: "StreamNamePartitioner", PYTHON_FIELD: "Python partitioner (message field)"}
TAGS = {STREAM_NAME: "pjs", PYTHON_FIELD: "pjp"}
# An update that projects nothing this many times in a row means the projector is stuck.
_MAX_IDLE_UPDATES = 3


def steps(bench: Bench) -> int:
    return len(KINDS) * bench.settings.repetitions * len(bench.libraries)


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
        stream = lib.aggregated_stream(store, aggregated, kind, settings.projector_batch_size)
        database.generate_backlog(bench.conn, name, settings.messages, settings.streams)
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
            params={
                "messages": settings.messages,
                "streams": settings.streams,
                "update_batch_size": settings.projector_batch_size,
            },
        )
        for kind, label in KINDS.items()
    }
    for repetition in range(settings.repetitions):
        for kind in KINDS:
            for lib in bench.order(repetition):
                figure = figures[kind]
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
