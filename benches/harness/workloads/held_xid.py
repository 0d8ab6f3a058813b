"""Workload 7: catch-up projection while another database holds a transaction id open.

A PostgreSQL snapshot's `xmin` is the oldest transaction id still running anywhere in the
cluster, whatever database it runs in. A projector that looks for late commits among the
rows with `tx >= xmin` of its previous snapshot therefore re-reads every row written
after an idle-in-transaction session of some other application took its id: on a backlog
the re-read grows with each batch. This workload measures that case.

The same backlog (default 1M messages over 100k streams, generated in SQL as the
projection workload generates it, StreamNamePartitioner) is projected twice per
repetition on identical data: (a) plain, and (b) while a session connected to a scratch
database `dxb_idle_<pid>_<random>` of the same cluster holds a transaction open that took
an id (`BEGIN; SELECT pg_current_xact_id()`) before the store was created and the backlog
written, so every backlog row has a higher id. The session stays open until the catch-up
ends, then rolls back and the database is dropped, also when the run is interrupted
(Ctrl-C or SIGTERM). The slowdown is (b)/(a) in seconds, per repetition.

depeche-rs only: depeche-db projects about 0.7k msg/s, so hours at this size.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import psycopg

from .. import database
from ..bench import Bench, error_text
from ..figures import Figure
from ..libraries import STREAM_NAME, Library
from ..report import GOAL_RATIO
from .memory import size_label
from .projection import projection_digest

LIB = "depeche_rs"
PLAIN = "plain"
HELD = "held"
CASES = {PLAIN: "a", HELD: "b"}
# An update that projects nothing this many times in a row means the projector is stuck.
_MAX_IDLE_UPDATES = 3
# The held session ends itself this long after the time limit if the harness is gone
# without cleaning up (it is frozen, say): an open xid slows every projector in the cluster.
_SAFETY_MARGIN_S = 1800
# What the seconds rows keep of a measurement (the msg/s rows keep all of it).
_SECONDS_DETAIL = ("case", "seconds", "rows", "completed", "partial")


def steps(bench: Bench) -> int:
    return 2 * bench.settings.repetitions if LIB in bench.libraries else 0


@dataclasses.dataclass
class HeldXid:
    database: str
    xid: int
    conn: psycopg.Connection[Any]


@contextmanager
def held_xid(bench: Bench) -> Iterator[HeldXid]:
    """A transaction in a scratch database of the same cluster that holds an xid until exit.

    On exit, also through an exception or KeyboardInterrupt, the transaction is rolled back
    and the database dropped.
    """
    name = database.check_name(f"{database.IDLE_DATABASE_MARK}{os.getpid()}_{secrets.token_hex(3)}")
    bench.conn.execute(f"CREATE DATABASE {name}".encode())
    conn: psycopg.Connection[Any] | None = None
    try:
        timeout_ms = int((bench.settings.held_xid_time_limit_s + _SAFETY_MARGIN_S) * 1000)
        conn = database.connect_to_database(
            bench.dsn,
            name,
            autocommit=True,
            application_name="depeche-rs bench: held xid",
            options=f"-c idle_in_transaction_session_timeout={timeout_ms}",
        )
        conn.execute("BEGIN")
        row = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
        assert row is not None
        yield HeldXid(database=name, xid=int(row[0]), conn=conn)
    finally:
        if conn is not None:
            try:
                conn.execute("ROLLBACK")
            except psycopg.Error:
                pass  # gone already: the server rolled it back
            conn.close()
        try:
            database.drop_database(bench.conn, name, force=True)
        except psycopg.Error as exc:
            bench.progress.note(f"dropping scratch database {name} failed: {exc}")


def still_held(bench: Bench, held: HeldXid) -> bool:
    """The xid is still running and its session still open (no timeout ended it)."""
    row = bench.conn.execute("SELECT pg_xact_status(%s::text::xid8)", (str(held.xid),)).fetchone()
    return row is not None and row[0] == "in progress" and not held.conn.closed


def drop_leftovers(bench: Bench) -> None:
    """Drop scratch databases an earlier run could not drop (it was killed, say)."""
    for name in database.idle_databases(bench.conn):
        try:
            database.drop_database(bench.conn, name, force=False)
            bench.progress.note(f"dropped leftover scratch database {name}")
        except psycopg.Error as exc:
            bench.progress.note(f"leftover scratch database {name} not dropped (in use?): {exc}")


@contextmanager
def terminate_interrupts() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, so the held xid is released and its
    database dropped (the default action would end the process without cleanup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def project_within(lib: Library, stream: Any, expected: int, limit_s: float) -> int:
    """Call `update_full()` until the backlog is projected or the time limit is reached."""
    deadline = time.monotonic() + limit_s
    budget_type = getattr(lib.module, "FixedTimeBudget", None)
    total = 0
    idle = 0
    while total < expected and idle < _MAX_IDLE_UPDATES:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if budget_type is None:
            result = stream.projector.update_full()
        else:
            result = stream.projector.update_full(budget=budget_type(seconds=remaining))
        updated = int(result[0])
        total += updated
        idle = idle + 1 if updated == 0 else 0
    return total


def snapshot_state(bench: Bench, table: str) -> dict[str, Any]:
    """The harness's view of the cluster's snapshot, and how many backlog rows have a
    transaction id at or above its xmin (the rows a `tx >= xmin` probe reads)."""
    row = bench.conn.execute(
        f"SELECT pg_current_snapshot()::text, count(*) FROM {table} "
        f"WHERE tx >= pg_snapshot_xmin(pg_current_snapshot())".encode()
    ).fetchone()
    assert row is not None
    return {"snapshot": str(row[0]), "rows_tx_at_or_above_xmin": int(row[1])}


def measure(bench: Bench, lib: Library, case: str, repetition: int) -> dict[str, Any]:
    settings = bench.settings
    messages = settings.held_xid_messages
    name = bench.store_name(lib.short, f"hx{CASES[case]}", repetition)
    aggregated = f"{name}_a"
    table = database.message_table(name)
    holding = held_xid(bench) if case == HELD else nullcontext(None)
    # The xid is taken first: the store and its backlog are written after it.
    with holding as held, bench.scratch(name):
        store = lib.store(name)
        stream = lib.aggregated_stream(
            store, aggregated, STREAM_NAME, settings.projector_batch_size
        )
        database.generate_backlog(bench.conn, name, messages, settings.held_xid_streams)
        detail: dict[str, Any] = {"case": case, "messages": messages}
        detail["before"] = snapshot_state(bench, table)
        if held is not None:
            above = bench.conn.execute(
                f"SELECT count(*) FROM {table} WHERE tx > %s::text::xid8".encode(),
                (str(held.xid),),
            ).fetchone()
            detail["held_xid"] = held.xid
            detail["held_database"] = held.database
            detail["rows_tx_above_held_xid"] = int(above[0]) if above else 0
            if detail["rows_tx_above_held_xid"] != messages:
                raise RuntimeError(
                    f"only {detail['rows_tx_above_held_xid']} of {messages} backlog rows "
                    f"have a transaction id above the held xid {held.xid}"
                )
        started = time.perf_counter()
        projected = project_within(lib, stream, messages, settings.held_xid_time_limit_s)
        elapsed = time.perf_counter() - started
        if held is not None and not still_held(bench, held):
            raise RuntimeError(f"the held xid {held.xid} ended before the catch-up did")
        detail["after"] = snapshot_state(bench, table)
        rows, digest = projection_digest(bench, database.stream_table(aggregated))
    completed = rows >= messages
    if not completed and projected < messages and elapsed < settings.held_xid_time_limit_s:
        raise RuntimeError(f"projected {rows} rows of {messages} messages, then stopped")
    detail.update(
        {
            "projected_reported": projected,
            "rows": rows,
            "seconds": elapsed,
            "msg_per_s": rows / elapsed if elapsed > 0 else float("nan"),
            "digest": digest,
            "completed": completed,
            # Stopped at the time limit: msg/s is over what was projected, the seconds
            # (and the slowdown) are lower bounds.
            "partial": not completed,
        }
    )
    if case == PLAIN and detail["before"]["rows_tx_at_or_above_xmin"]:
        # Another session of the cluster held an xid older than the backlog: (a) was not
        # plain. Kept in the JSON and said in the progress line.
        detail["disturbed"] = True
    return detail


def make_figures(bench: Bench) -> dict[str, Figure]:
    settings = bench.settings
    size = (
        f"{size_label(settings.held_xid_messages)} msgs / "
        f"{size_label(settings.held_xid_streams)} streams"
    )
    params = {
        "messages": settings.held_xid_messages,
        "streams": settings.held_xid_streams,
        "partitioner": STREAM_NAME,
        "update_batch_size": settings.projector_batch_size,
        "time_limit_s": settings.held_xid_time_limit_s,
        "goal_ratio": GOAL_RATIO,
    }
    specs = [
        ("plain", f"held xid (a): catch-up {size}, plain", "msg/s", "higher", True),
        ("plain-seconds", "held xid (a): seconds", "s", "lower", False),
        ("held", "held xid (b): the same, xid held in another database", "msg/s", "higher", True),
        ("held-seconds", "held xid (b): seconds", "s", "lower", False),
        ("slowdown", f"held xid: slowdown (b)/(a), goal <= {GOAL_RATIO}", "x", "lower", False),
    ]
    figures = {}
    for key, label, unit, better, throughput in specs:
        figures[key] = Figure(
            key=f"held_xid/{key}",
            label=label,
            unit=unit,
            better=better,  # type: ignore[arg-type]
            group="held_xid",
            throughput=throughput,
            params=dict(params),
            only=[LIB],
        )
    figures["slowdown"].params["definition"] = (
        "per repetition: seconds of (b) / seconds of (a); median over repetitions"
    )
    return figures


def run(bench: Bench) -> list[Figure]:
    figures = make_figures(bench)
    lib = bench.libraries.get(LIB)
    if lib is None:
        if LIB not in bench.unavailable:
            for figure in figures.values():
                figure.fail(LIB, "not requested (--libs)")
        return list(figures.values())
    digests: set[str] = set()
    with terminate_interrupts():
        drop_leftovers(bench)
        for repetition in range(bench.settings.repetitions):
            # Alternate which case runs first, so neither always gets the warmer server.
            cases = [PLAIN, HELD] if repetition % 2 == 0 else [HELD, PLAIN]
            results: dict[str, dict[str, Any]] = {}
            for case in cases:
                text = f"held xid ({CASES[case]}) {case}"
                try:
                    with bench.progress.running(text):
                        detail = measure(bench, lib, case, repetition)
                except Exception as exc:
                    for key in (case, f"{case}-seconds", "slowdown"):
                        figures[key].fail(LIB, error_text(exc))
                    bench.progress.step(f"{text} rep {repetition + 1}: FAILED {error_text(exc)}")
                    continue
                results[case] = detail
                figures[case].add(LIB, detail["msg_per_s"], detail)
                figures[f"{case}-seconds"].add(
                    LIB, detail["seconds"], {k: detail[k] for k in _SECONDS_DETAIL}
                )
                if detail["completed"]:
                    digests.add(detail["digest"])
                notes = []
                if detail["partial"]:
                    notes.append(f"partial: {detail['rows']:,} msgs at the time limit")
                if detail.get("disturbed"):
                    notes.append("another session held an older xid: not plain")
                if "held_xid" in detail:
                    notes.append(f"xid {detail['held_xid']} in {detail['held_database']}")
                suffix = f", {'; '.join(notes)}" if notes else ""
                bench.progress.step(
                    f"{text} rep {repetition + 1}: {detail['msg_per_s']:,.0f} msg/s "
                    f"({detail['seconds']:.1f}s{suffix})"
                )
            if PLAIN in results and HELD in results:
                ratio = results[HELD]["seconds"] / results[PLAIN]["seconds"]
                partial = results[HELD]["partial"] or results[PLAIN]["partial"]
                figures["slowdown"].add(
                    LIB,
                    ratio,
                    {
                        "plain_seconds": results[PLAIN]["seconds"],
                        "held_seconds": results[HELD]["seconds"],
                        "partial": partial,
                    },
                )
                bench.progress.note(
                    f"held xid rep {repetition + 1}: slowdown (b)/(a) {ratio:.2f}x "
                    f"(goal <= {GOAL_RATIO})"
                )
    if digests:
        same = len(digests) == 1
        for figure in figures.values():
            figure.params["identical_output"] = same
        verdict = "identical" if same else "DIFFER"
        bench.progress.note(f"held xid: projected rows {verdict} across cases and repetitions")
    return list(figures.values())
