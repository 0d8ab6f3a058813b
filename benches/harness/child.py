"""Entry points run in a separate process: `python -m harness.child {project,serve} ...`.

The projector's memory is measured in a process that does nothing else, and the live
latency workload runs projector and subscription in their own process, as production
does, so the harness's writer and observer threads do not share their interpreter.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from .libraries import Library, load_library
from .messages import AccountCredited


def _rss_kib() -> int:
    return int(psutil.Process().memory_info().rss // 1024)


def _peak_rss_kib() -> int:
    """Peak RSS of this process image, in KiB.

    Linux keeps ru_maxrss across exec, so a child started from a large parent reports the
    parent's size; VmHWM belongs to the new address space and starts from zero at exec.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # macOS reports bytes, Linux KiB.
    return int(peak // 1024 if sys.platform == "darwin" else peak)


def project(args: argparse.Namespace, lib: Library) -> dict[str, Any]:
    """Project a backlog and report peak RSS (the kernel's high-water mark for us)."""
    store = lib.store(args.store)
    stream = lib.aggregated_stream(store, args.stream, args.partitioner, args.batch_size)
    baseline = _rss_kib()
    baseline_peak = _peak_rss_kib()
    deadline = time.monotonic() + args.time_limit
    started = time.perf_counter()
    projected = 0
    idle = 0
    while projected < args.expected and idle < 3:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        # A time budget (depeche-db's FixedTimeBudget) bounds a projector that would
        # otherwise run a 1M backlog to the end in one call; the figure then says partial.
        budget_type = getattr(lib.module, "FixedTimeBudget", None)
        if budget_type is None:
            result = stream.projector.update_full()
        else:
            result = stream.projector.update_full(budget=budget_type(seconds=remaining))
        updated = int(result[0])
        projected += updated
        idle = idle + 1 if updated == 0 else 0
    completed = projected >= args.expected
    return {
        "baseline_rss_kib": baseline,
        "baseline_peak_rss_kib": baseline_peak,
        "peak_rss_kib": _peak_rss_kib(),
        "final_rss_kib": _rss_kib(),
        "projected": projected,
        "completed": completed,
        "seconds": time.perf_counter() - started,
    }


class HandledLog:
    """Records (event id, wall time) per handled message and flushes them to a file.

    The parent process reads the file to know how far the subscription got, and the
    records survive if the child has to be killed.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flush_loop, daemon=True)
        path.write_text("")

    def record(self, message: AccountCredited) -> None:
        now = time.time()
        with self._lock:
            self._pending.append(f"{message.event_id} {now:.6f}\n")

    def start(self) -> None:
        self._thread.start()

    def _flush(self) -> None:
        with self._lock:
            lines, self._pending = self._pending, []
        if lines:
            with self._path.open("a") as handle:
                handle.writelines(lines)

    def _flush_loop(self) -> None:
        while not self._stop.wait(0.1):
            self._flush()

    def close(self) -> None:
        self._stop.set()
        self._flush()


def serve(args: argparse.Namespace, lib: Library) -> dict[str, Any]:
    """Run the library's Executor with the projector and a subscription until SIGTERM."""
    log = HandledLog(Path(args.handled_log))
    store = lib.store(args.store)
    stream = lib.aggregated_stream(store, args.stream, args.partitioner, args.batch_size)
    subscription = stream.subscription(
        name=args.subscription,
        handlers=lib.handlers(log.record),
        batch_size=args.subscription_batch_size,
        ack_strategy=lib.ack_strategy(args.ack_strategy),
    )
    # The Executor installs its own SIGTERM/SIGINT handlers (that is how depeche-db stops
    # it); ours only runs if a library's Executor does not.
    executor = lib.module.Executor(db_dsn=lib.executor_dsn)
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):

        def stop(signum: int, frame: FrameType | None) -> None:
            halt = getattr(executor, "stop", None) or executor._stop
            halt()

        signal.signal(signal.SIGTERM, stop)
    executor.register(stream.projector)
    executor.register(subscription.runner)
    log.start()
    print("ready", flush=True)
    try:
        executor.run()
    finally:
        log.close()
    return {"stopped": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness.child")
    parser.add_argument("mode", choices=["project", "serve"])
    parser.add_argument("--lib", required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--engine", default="sqlalchemy")
    parser.add_argument("--store", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--partitioner", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--expected", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=600.0)
    parser.add_argument("--subscription", default="")
    parser.add_argument("--subscription-batch-size", type=int, default=10)
    parser.add_argument("--ack-strategy", default="SINGLE")
    parser.add_argument("--handled-log", default="")
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    lib = load_library(args.lib, args.dsn, args.engine)
    result: dict[str, Any]
    try:
        result = project(args, lib) if args.mode == "project" else serve(args, lib)
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
        # The parent shows the tail of stderr when a child dies before it is ready.
        print(result["error"], file=sys.stderr, flush=True)
    Path(args.result).write_text(json.dumps(result))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
