"""Workload 3: live latency under a steady writer.

Three parties, as in production:

- a child process runs the library's `Executor` with the projector and a subscription
  (no-op handler that records the wall time of each call; BATCHED ack by default, the
  strategy with which depeche-db comes closest to keeping up with 500 msg/s);
- the harness writes one message per transaction at a fixed rate (plain SQL INSERTs by
  default, the same for both libraries; `--latency-writer library` uses each library's
  `store.write`), recording the wall time right after each commit;
- an observer thread LISTENs on the aggregated stream's channel and, on each wake-up,
  reads which rows became visible, recording the wall time of the wake-up.

Latencies are commit -> projected row visible, and commit -> handler call, in ms. The first
`latency_warmup_seconds` of messages are left out (connections and caches warming up).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from psycopg.types.json import Jsonb

from .. import database
from ..bench import Bench, error_text
from ..figures import Figure, percentile
from ..libraries import STREAM_NAME, Library
from ..messages import AccountCredited, new_message, stream_name
from ..subprocesses import child_command, start_child

PERCENTILES = (50, 95, 99)
_TAG = "lat"
_POLL_S = 0.05


def steps(bench: Bench) -> int:
    return bench.settings.repetitions * len(bench.libraries)


class ProjectedObserver(threading.Thread):
    """Records when each message's projected row becomes visible to another session."""

    def __init__(self, dsn: str, aggregated: str) -> None:
        super().__init__(daemon=True)
        self._dsn = dsn
        self._table = database.stream_table(aggregated)
        self._channel = f"depeche_{database.check_name(aggregated)}_messages"
        self._halt = threading.Event()
        self.seen: dict[str, float] = {}
        self.found_by_notification = 0
        self.found_by_poll = 0
        self.error: str | None = None
        self.listening = threading.Event()

    def run(self) -> None:
        try:
            self._observe()
        except Exception as exc:
            self.error = error_text(exc)
            self.listening.set()

    def _observe(self) -> None:
        query = (
            f"SELECT message_id::text, origin_stream_global_position FROM {self._table} "
            "WHERE origin_stream_global_position > %s"
        ).encode()
        with database.connection(self._dsn) as conn:
            # Through the index on the global position (both libraries' tables have it):
            # the table is too fresh for its statistics to say so, and a scan of the whole
            # table at every wake-up took a fifth of a core from the library measured.
            conn.execute(b"SET enable_seqscan = off")
            conn.execute(f"LISTEN {self._channel}".encode())
            self.listening.set()
            # With one writer, commits come in global-position order, so "after the
            # highest position seen" finds every newly visible row.
            last = 0
            while not self._halt.is_set():
                woken = any(True for _ in conn.notifies(timeout=_POLL_S, stop_after=1))
                now = time.time()
                # Drain the rest of a burst (depeche-db notifies once per row).
                for _ in conn.notifies(timeout=0.0):
                    pass
                rows = conn.execute(query, (last,)).fetchall()
                for message_id, position in rows:
                    last = max(last, int(position))
                    if message_id not in self.seen:
                        self.seen[message_id] = now
                        if woken:
                            self.found_by_notification += 1
                        else:
                            self.found_by_poll += 1

    def stop(self) -> None:
        self._halt.set()
        if self.ident is not None:
            self.join(timeout=5)


def read_handled(path: Path) -> dict[str, float]:
    handled: dict[str, float] = {}
    if not path.exists():
        return handled
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            # At-least-once delivery: keep the first call.
            handled.setdefault(parts[0], float(parts[1]))
    return handled


def count_lines(path: Path) -> int:
    try:
        with path.open("rb") as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 16), b""))
    except FileNotFoundError:
        return 0


class SqlWriter:
    """Writes like any client of the tables would: one INSERT per transaction, no library.

    The default writer of this workload: both projectors then face the very same write
    stream, and the rate does not depend on how fast a library's Python writer is
    (depeche-db's `store.write` tops out below 500 msg/s on a 2-core machine). Columns are
    named as in `database.generate_backlog`, including `occurred_at` when present.
    """

    def __init__(self, dsn: str, store: str) -> None:
        self._conn = database.connect(dsn)
        table = database.message_table(store)
        occurred = "occurred_at" in database.table_columns(self._conn, table)
        self._with_time = occurred
        self._sql = (
            f"INSERT INTO {table} (message_id, global_position, stream, version, message"
            f"{', occurred_at' if occurred else ''}) VALUES (%s, nextval('{table}_global_seq'), "
            f"%s, %s, %s{', %s' if occurred else ''})"
        ).encode()
        self._versions: dict[str, int] = {}

    def write(self, stream: str, message: AccountCredited) -> None:
        version = self._versions.get(stream, 0) + 1
        self._versions[stream] = version
        body = message.model_dump(mode="json")
        body["__typename__"] = type(message).__name__
        params: list[Any] = [message.event_id, stream, version, Jsonb(body)]
        if self._with_time:
            params.append(message.occurred_at)
        self._conn.execute(self._sql, params, prepare=True)

    def close(self) -> None:
        self._conn.close()


def write_steadily(
    write: Callable[[str, AccountCredited], Any], rate: float, seconds: float, streams: int
) -> tuple[dict[str, float], float]:
    """Write `rate` messages per second for `seconds`; return commit times and start time.

    Messages follow a fixed schedule; a writer that falls behind writes at once until it
    catches up, so the achieved rate shows whether the writer kept up.
    """
    commits: dict[str, float] = {}
    total = int(rate * seconds)
    started = time.time()
    for number in range(total):
        due = started + number / rate
        pause = due - time.time()
        if pause > 0:
            time.sleep(pause)
        message = new_message(number % streams, number)
        write(stream_name(number % streams), message)
        commits[str(message.event_id)] = time.time()
    return commits, started


def wait_ready(child: subprocess.Popen[str], timeout: float) -> None:
    """Block until the child prints "ready" (its Executor is about to run)."""
    result: list[str] = []
    reader = threading.Thread(
        target=lambda: result.append(child.stdout.readline() if child.stdout else ""),
        daemon=True,
    )
    reader.start()
    reader.join(timeout)
    if not result or result[0].strip() != "ready":
        stderr = ""
        if child.poll() is not None and child.stderr:
            stderr = child.stderr.read()[-600:]
        raise RuntimeError(f"executor child not ready (exit {child.returncode}): {stderr}")


def stop_child(child: subprocess.Popen[str]) -> str:
    """SIGTERM (how both libraries' Executor stops), then SIGKILL if it hangs."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    try:
        _, stderr = child.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        child.kill()
        _, stderr = child.communicate()
    return stderr or ""


def latencies(commits: dict[str, float], seen: dict[str, float], gave_up: float) -> list[float]:
    """Latency of every message in ms; one never seen counts as seen when we gave up.

    Leaving unseen messages out would flatter a library that falls behind; counting them
    at the give-up time makes the percentiles lower bounds, and `not_projected` /
    `not_handled` in the figures say how many there were.
    """
    return [(seen.get(key, gave_up) - at) * 1000 for key, at in commits.items()]


def measure(bench: Bench, lib: Library, repetition: int) -> dict[str, Any]:
    settings = bench.settings
    name = bench.store_name(lib.short, _TAG, repetition)
    aggregated = f"{name}_a"
    with bench.scratch(name), tempfile.TemporaryDirectory(prefix="dxb-") as scratch:
        store = lib.store(name)
        lib.aggregated_stream(store, aggregated, STREAM_NAME, settings.projector_batch_size)
        handled_log = Path(scratch) / "handled.txt"
        command = child_command(
            "serve",
            lib,
            bench.engine_kind,
            "--store",
            name,
            "--stream",
            aggregated,
            "--partitioner",
            STREAM_NAME,
            "--batch-size",
            str(settings.projector_batch_size),
            "--subscription",
            f"{name}_s",
            "--subscription-batch-size",
            str(settings.subscription_batch_size),
            "--ack-strategy",
            settings.latency_ack,
            "--handled-log",
            str(handled_log),
            "--result",
            str(Path(scratch) / "result.json"),
        )
        # Equal terms: neither library starts while the server still works off the run
        # before it, or pays for a checkpoint falling due within its run.
        database.settle(bench.conn)
        observer = ProjectedObserver(bench.dsn, aggregated)
        child = start_child(command)
        stderr = ""
        # A short switch interval keeps the writer thread from delaying the observer's
        # timestamps by the default 5 ms.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        try:
            wait_ready(child, timeout=60)
            observer.start()
            observer.listening.wait(10)
            # Give the Executor a moment to connect its listener before the clock starts.
            time.sleep(0.5)
            total_seconds = settings.latency_warmup_seconds + settings.latency_seconds
            if settings.latency_writer == "sql":
                sql_writer = SqlWriter(bench.dsn, name)
                writer: Callable[[str, AccountCredited], Any] = sql_writer.write
            else:
                writer = store.write
            try:
                commits, started = write_steadily(
                    writer, settings.latency_rate, total_seconds, settings.write_streams
                )
            finally:
                if settings.latency_writer == "sql":
                    sql_writer.close()
            write_seconds = time.time() - started
            deadline = time.monotonic() + settings.latency_settle_seconds
            while time.monotonic() < deadline and child.poll() is None:
                if len(observer.seen) >= len(commits) and count_lines(handled_log) >= len(commits):
                    break
                time.sleep(0.1)
            # Let the handled log flush its last lines.
            time.sleep(0.3)
            gave_up = time.time()
        finally:
            sys.setswitchinterval(switch_interval)
            stderr = stop_child(child)
            observer.stop()
        handled = read_handled(handled_log)
    if observer.error:
        raise RuntimeError(f"observer failed: {observer.error}")
    if not handled and not observer.seen:
        raise RuntimeError(f"nothing projected or handled; executor stderr: {stderr[-600:]}")
    warm_from = started + settings.latency_warmup_seconds
    measured = {key: at for key, at in commits.items() if at >= warm_from}
    projected_ms = latencies(measured, observer.seen, gave_up)
    handler_ms = latencies(measured, handled, gave_up)
    detail: dict[str, Any] = {
        "target_rate": settings.latency_rate,
        "written": len(commits),
        "achieved_rate": len(commits) / write_seconds if write_seconds > 0 else 0.0,
        "measured_messages": len(measured),
        "not_projected": sum(1 for key in measured if key not in observer.seen),
        "not_handled": sum(1 for key in measured if key not in handled),
        "found_by_notification": observer.found_by_notification,
        "found_by_poll": observer.found_by_poll,
        "ack_strategy": settings.latency_ack,
        "writer": settings.latency_writer,
    }
    # Where the time goes: projected row visible -> handler call, per message seen at both
    # (the projection's notification wakes the observer and the Executor alike).
    delivery_ms = [
        (handled[key] - observer.seen[key]) * 1000
        for key in measured
        if key in handled and key in observer.seen
    ]
    for what, values in (
        ("projected", projected_ms),
        ("handler", handler_ms),
        ("delivery", delivery_ms),
    ):
        for q in PERCENTILES:
            detail[f"{what}_p{q}_ms"] = percentile(values, q)
        detail[f"{what}_max_ms"] = max(values) if values else float("nan")
    if stderr.strip() and (detail["not_projected"] or detail["not_handled"]):
        detail["executor_stderr_tail"] = stderr[-600:]
    return detail


def run(bench: Bench) -> list[Figure]:
    settings = bench.settings
    params = {
        "rate_msg_per_s": settings.latency_rate,
        "seconds": settings.latency_seconds,
        "warmup_seconds": settings.latency_warmup_seconds,
        "streams": settings.write_streams,
        "partitioner": STREAM_NAME,
        "ack_strategy": settings.latency_ack,
        "writer": settings.latency_writer,
        "subscription_batch_size": settings.subscription_batch_size,
    }
    figures: dict[str, Figure] = {}
    for what, label in (("projected", "commit -> projected row"), ("handler", "commit -> handler")):
        for q in PERCENTILES:
            figures[f"{what}_p{q}_ms"] = Figure(
                key=f"latency/{what}-p{q}",
                label=f"live latency p{q}, {label}",
                unit="ms",
                better="lower",
                group="latency",
                params=params,
            )
    rate = Figure(
        key="latency/achieved-write-rate",
        label=f"live: achieved write rate (target {settings.latency_rate:g}/s)",
        unit="msg/s",
        better="higher",
        group="latency",
        params=params,
    )
    for repetition in range(settings.repetitions):
        for lib in bench.order(repetition):
            try:
                with bench.progress.running(f"latency {lib.label}"):
                    detail = measure(bench, lib, repetition)
            except Exception as exc:
                for figure in [*figures.values(), rate]:
                    figure.fail(lib.name, error_text(exc))
                bench.progress.step(
                    f"latency {lib.label} rep {repetition + 1}: FAILED {error_text(exc)}"
                )
                continue
            rate.add(lib.name, detail["achieved_rate"], detail)
            for field, figure in figures.items():
                missing = detail[
                    "not_projected" if field.startswith("projected") else "not_handled"
                ]
                # Unseen messages count at the give-up time: the figure is then a lower bound.
                figure.add(lib.name, detail[field], {"lower_bound": missing > 0})
            lost = ""
            if detail["not_projected"] or detail["not_handled"]:
                lost = (
                    f", NOT SEEN: {detail['not_projected']} projected / "
                    f"{detail['not_handled']} handled"
                )
            bench.progress.step(
                f"latency {lib.label} rep {repetition + 1}: "
                f"projected p50/p99 {detail['projected_p50_ms']:.1f}/"
                f"{detail['projected_p99_ms']:.1f} ms, handler p50/p99 "
                f"{detail['handler_p50_ms']:.1f}/{detail['handler_p99_ms']:.1f} ms "
                f"(projected -> handler p50/p99 {detail['delivery_p50_ms']:.1f}/"
                f"{detail['delivery_p99_ms']:.1f}) at {detail['achieved_rate']:.0f} msg/s{lost}"
            )
    return [rate, *figures.values()]
