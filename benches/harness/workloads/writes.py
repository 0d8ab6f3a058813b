"""Workload 5: writes, one message per transaction and batches of 10 and 100.

depeche-db has no batched write, so a batch there is the documented outbox pattern:
several `store.write(..., conn=conn)` in one transaction, then commit. depeche-rs offers
`store.write_many(stream, messages)`; it is used when present and recorded in the figures.
"""

from __future__ import annotations

import time
from typing import Any

from ..bench import Bench, error_text
from ..figures import Figure
from ..libraries import Library
from ..messages import AccountCredited, new_message, stream_name

BATCH_SIZES = (1, 10, 100)
_TAG = "wr"


def steps(bench: Bench) -> int:
    return len(BATCH_SIZES) * bench.settings.repetitions * len(bench.libraries)


def prepare(count: int, batch: int, streams: int) -> list[tuple[str, list[AccountCredited]]]:
    """Messages built beforehand, so only the write is timed; a batch goes to one stream."""
    batches = []
    for number in range(count // batch):
        account = number % streams
        messages = [new_message(account, amount) for amount in range(batch)]
        batches.append((stream_name(account), messages))
    return batches


def write_batches(lib: Library, store: Any, batches: list[tuple[str, list[Any]]]) -> str:
    """Write every batch in its own transaction; return the method used."""
    if len(batches[0][1]) == 1:
        for stream, messages in batches:
            store.write(stream, messages[0])
        return "write"
    write_many = getattr(store, "write_many", None)
    if write_many is not None:
        for stream, messages in batches:
            write_many(stream, messages)
        return "write_many"
    for stream, messages in batches:
        with lib.engine.connect() as conn:
            for message in messages:
                store.write(stream, message, conn=conn)
            conn.commit()
    return "write(conn=...) + commit"


def measure(bench: Bench, lib: Library, batch: int, repetition: int) -> dict[str, Any]:
    settings = bench.settings
    count = settings.write_messages if batch == 1 else settings.write_batched_messages
    batches = prepare(count, batch, settings.write_streams)
    name = bench.store_name(lib.short, f"{_TAG}{batch}", repetition)
    with bench.scratch(name):
        store = lib.store(name)
        started = time.perf_counter()
        method = write_batches(lib, store, batches)
        elapsed = time.perf_counter() - started
        row = bench.conn.execute(f"SELECT count(*) FROM depeche_msgs_{name}".encode()).fetchone()
    written = int(row[0]) if row else 0
    if written != count:
        raise RuntimeError(f"table holds {written} of {count} written messages")
    return {
        "messages": count,
        "batch": batch,
        "transactions": len(batches),
        "method": method,
        "seconds": elapsed,
        "msg_per_s": count / elapsed,
    }


def run(bench: Bench) -> list[Figure]:
    settings = bench.settings
    counts = {
        batch: settings.write_messages if batch == 1 else settings.write_batched_messages
        for batch in BATCH_SIZES
    }
    figures = {
        batch: Figure(
            key=f"writes/batch-{batch}",
            label=(
                "writes, 1 message per transaction"
                if batch == 1
                else f"writes, {batch} messages per transaction"
            ),
            unit="msg/s",
            better="higher",
            group="writes",
            throughput=True,
            params={
                "messages": counts[batch],
                "streams": settings.write_streams,
                "batch": batch,
            },
        )
        for batch in BATCH_SIZES
    }
    for repetition in range(settings.repetitions):
        for batch in BATCH_SIZES:
            for lib in bench.order(repetition):
                figure = figures[batch]
                try:
                    with bench.progress.running(f"writes x{batch} {lib.label}"):
                        detail = measure(bench, lib, batch, repetition)
                except Exception as exc:
                    figure.fail(lib.name, error_text(exc))
                    bench.progress.step(
                        f"writes x{batch} {lib.label} rep {repetition + 1}: "
                        f"FAILED {error_text(exc)}"
                    )
                    continue
                figure.add(lib.name, detail["msg_per_s"], detail)
                bench.progress.step(
                    f"writes x{batch} {lib.label} rep {repetition + 1}: "
                    f"{detail['msg_per_s']:,.0f} msg/s via {detail['method']} "
                    f"({detail['seconds']:.1f}s)"
                )
    return list(figures.values())
