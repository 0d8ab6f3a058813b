"""Workload 4: a subscription drains a projected backlog with a no-op handler.

The backlog is projected by the library's own projector (not measured) with the Python
partitioner over 64 partitions; then one subscription per ack strategy reads it all.
"""

from __future__ import annotations

import time
from typing import Any

from .. import database
from ..bench import Bench, error_text
from ..figures import Figure
from ..libraries import PYTHON_FIELD, Library
from ..messages import ACCOUNT_PARTITIONS, AccountCredited
from .projection import project_all

STRATEGIES = ("SINGLE", "BATCHED")
_TAG = "drn"
# run_once() calls that hand out nothing, in a row, before the drain counts as stuck.
_MAX_IDLE_RUNS = 5


def steps(bench: Bench) -> int:
    return len(STRATEGIES) * bench.settings.repetitions * len(bench.libraries)


def drain(lib: Library, stream: Any, name: str, strategy: str, expected: int, batch: int) -> int:
    handled = 0

    def on_message(message: AccountCredited) -> None:
        nonlocal handled
        handled += 1

    subscription = stream.subscription(
        name=name,
        handlers=lib.handlers(on_message),
        batch_size=batch,
        ack_strategy=lib.ack_strategy(strategy),
    )
    idle = 0
    while handled < expected and idle < _MAX_IDLE_RUNS:
        before = handled
        subscription.runner.run_once()
        idle = idle + 1 if handled == before else 0
    return handled


def measure(bench: Bench, lib: Library, repetition: int) -> dict[str, dict[str, Any]]:
    settings = bench.settings
    count = settings.drain_messages
    name = bench.store_name(lib.short, _TAG, repetition)
    results: dict[str, dict[str, Any]] = {}
    with bench.scratch(name):
        store = lib.store(name)
        stream = lib.aggregated_stream(
            store, f"{name}_a", PYTHON_FIELD, settings.projector_batch_size
        )
        database.generate_backlog(bench.conn, name, count, settings.streams)
        projected = project_all(stream, count)
        if projected < count:
            raise RuntimeError(f"setup projected {projected} of {count} messages")
        # Alternate which strategy goes first: the second one finds the backlog cached.
        strategies = STRATEGIES if repetition % 2 == 0 else STRATEGIES[::-1]
        for strategy in strategies:
            started = time.perf_counter()
            handled = drain(
                lib,
                stream,
                f"{name}_{strategy.lower()}",
                strategy,
                count,
                settings.subscription_batch_size,
            )
            elapsed = time.perf_counter() - started
            results[strategy] = {
                "messages": count,
                "handled": handled,
                "seconds": elapsed,
                "msg_per_s": handled / elapsed if elapsed > 0 else 0.0,
            }
    return results


def run(bench: Bench) -> list[Figure]:
    settings = bench.settings
    figures = {
        strategy: Figure(
            key=f"drain/{strategy.lower()}",
            label=f"subscription drain, AckStrategy.{strategy}",
            unit="msg/s",
            better="higher",
            group="subscription",
            throughput=True,
            params={
                "messages": settings.drain_messages,
                "partitions": ACCOUNT_PARTITIONS,
                "batch_size": settings.subscription_batch_size,
                "handler": "no-op",
            },
        )
        for strategy in STRATEGIES
    }
    for repetition in range(settings.repetitions):
        for lib in bench.order(repetition):
            try:
                with bench.progress.running(f"drain {lib.label}"):
                    results = measure(bench, lib, repetition)
            except Exception as exc:
                for strategy, figure in figures.items():
                    figure.fail(lib.name, error_text(exc))
                    bench.progress.step(
                        f"drain {strategy} {lib.label} rep {repetition + 1}: "
                        f"FAILED {error_text(exc)}"
                    )
                continue
            for strategy, detail in results.items():
                figure = figures[strategy]
                if detail["handled"] < detail["messages"]:
                    figure.fail(
                        lib.name, f"handled {detail['handled']} of {detail['messages']} messages"
                    )
                else:
                    figure.add(lib.name, detail["msg_per_s"], detail)
                bench.progress.step(
                    f"drain {strategy} {lib.label} rep {repetition + 1}: "
                    f"{detail['msg_per_s']:,.0f} msg/s ({detail['handled']} handled, "
                    f"{detail['seconds']:.1f}s)"
                )
    return list(figures.values())
