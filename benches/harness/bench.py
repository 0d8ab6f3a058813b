"""The run's settings and shared state: libraries, database access, naming, progress."""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from . import database
from .libraries import Library


@dataclasses.dataclass
class Settings:
    """Sizes of every workload; `quick()` and `full()` are the two presets."""

    quick: bool
    repetitions: int
    messages: int
    streams: int
    projector_batch_size: int
    drain_messages: int
    subscription_batch_size: int
    write_messages: int
    write_batched_messages: int
    write_streams: int
    latency_rate: float
    latency_seconds: float
    latency_warmup_seconds: float
    latency_settle_seconds: float
    latency_writer: str
    latency_ack: str
    memory_sizes: list[int]
    memory_time_limit_s: float
    held_xid_messages: int
    held_xid_streams: int
    held_xid_time_limit_s: float
    workloads: list[str]
    # Projection kinds to run (empty: all); the ceilings follow the stream-name kinds.
    projection_kinds: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def full(cls) -> Settings:
        return cls(
            quick=False,
            repetitions=3,
            messages=100_000,
            streams=10_000,
            projector_batch_size=1000,
            drain_messages=20_000,
            subscription_batch_size=100,
            write_messages=3_000,
            write_batched_messages=20_000,
            write_streams=1_000,
            latency_rate=500.0,
            latency_seconds=20.0,
            latency_warmup_seconds=2.0,
            latency_settle_seconds=30.0,
            latency_writer="sql",
            latency_ack="BATCHED",
            memory_sizes=[100_000, 1_000_000],
            memory_time_limit_s=600.0,
            held_xid_messages=1_000_000,
            held_xid_streams=100_000,
            held_xid_time_limit_s=1800.0,
            workloads=[],
        )

    @classmethod
    def quick_preset(cls) -> Settings:
        return cls(
            quick=True,
            repetitions=1,
            messages=5_000,
            streams=500,
            projector_batch_size=1000,
            drain_messages=2_000,
            subscription_batch_size=100,
            write_messages=500,
            write_batched_messages=1_000,
            write_streams=100,
            latency_rate=500.0,
            latency_seconds=3.0,
            latency_warmup_seconds=1.0,
            latency_settle_seconds=8.0,
            latency_writer="sql",
            latency_ack="BATCHED",
            memory_sizes=[5_000, 10_000],
            memory_time_limit_s=60.0,
            held_xid_messages=5_000,
            held_xid_streams=500,
            held_xid_time_limit_s=60.0,
            workloads=[],
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Progress:
    """Progress lines on stderr: step count, elapsed time, what runs and what it measured."""

    def __init__(self, total_steps: int) -> None:
        self.total = total_steps
        self.done = 0
        self.started = time.monotonic()

    def _prefix(self) -> str:
        elapsed = time.monotonic() - self.started
        width = len(str(self.total))
        return f"[{self.done:>{width}}/{self.total} {elapsed:6.1f}s]"

    def note(self, text: str) -> None:
        print(f"{self._prefix()} {text}", file=sys.stderr, flush=True)

    def step(self, text: str) -> None:
        """A measured step finished."""
        self.done += 1
        self.note(text)

    @contextmanager
    def running(self, text: str, every: float = 30.0) -> Iterator[None]:
        """Print a heartbeat every `every` seconds while a long step runs.

        depeche-db projects a 100k backlog in minutes inside one transaction, with nothing
        to show meanwhile; the heartbeat tells the reader the run is alive.
        """
        halt = threading.Event()
        started = time.monotonic()

        def beat() -> None:
            while not halt.wait(every):
                self.note(f"... {text}: running for {time.monotonic() - started:.0f}s")

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            halt.set()
            thread.join()


@dataclasses.dataclass
class Bench:
    """Everything a workload needs: settings, libraries, a harness connection, progress."""

    settings: Settings
    dsn: str
    libraries: dict[str, Library]
    unavailable: dict[str, str]
    progress: Progress
    engine_kind: str = "sqlalchemy"
    _conn: psycopg.Connection[Any] | None = None

    @property
    def conn(self) -> psycopg.Connection[Any]:
        """The harness's own autocommit connection, reopened if a workload broke it."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = database.connect(self.dsn)
            # A library that leaves a transaction open on its tables must not hang the
            # cleanup forever: the DROP then fails, is reported, and the run goes on.
            self._conn.execute("SET lock_timeout = '60s'")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def order(self, repetition: int) -> list[Library]:
        """Libraries in alternating order, so neither always runs on a warmer server."""
        libs = list(self.libraries.values())
        return libs if repetition % 2 == 0 else libs[::-1]

    @staticmethod
    def store_name(owner: str, tag: str, repetition: int) -> str:
        """A store name unique to a library, workload and repetition, marked for cleanup."""
        return database.check_name(f"{database.NAME_MARK}{owner}_{tag}_{repetition}")

    @contextmanager
    def scratch(self, marker: str) -> Iterator[None]:
        """Drop every object named after `marker` before and after the block."""
        database.drop_objects(self.conn, marker)
        try:
            yield
        finally:
            try:
                database.drop_objects(self.conn, marker)
            except psycopg.Error as exc:
                self.progress.note(f"cleanup of {marker} failed: {exc}")


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 500 else text[:497] + "..."
