"""The chaos harness: settings from the environment, worker processes and their
supervision, and the faults made from the test's own connection.

Every random decision of the controller and of each worker comes from the seed
(`DEPECHE_RS_CHAOS_SEED`), so a failing run can be replayed with the same sequence of
decisions (timings between processes differ from run to run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import sqlalchemy as sa

from . import _workers

DEFAULT_SEED = 7


@dataclasses.dataclass(frozen=True)
class Settings:
    """Knobs read from the environment (the defaults keep the suite under 3 minutes)."""

    seed: int
    seconds: float
    scale: float

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            seed=int(os.environ.get("DEPECHE_RS_CHAOS_SEED", DEFAULT_SEED)),
            seconds=float(os.environ.get("DEPECHE_RS_CHAOS_SECONDS", 30)),
            scale=float(os.environ.get("DEPECHE_RS_CHAOS_SCALE", 1)),
        )

    def scaled(self, n: int) -> int:
        return max(1, round(n * self.scale))


def derive_seed(seed: int, *parts: object) -> int:
    """A seed for one decision stream (a worker incarnation, the injector)."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def database_url(dsn: str, database: str) -> str:
    """`dsn` pointing at another database of the same server."""
    return sa.make_url(dsn).set(database=database).render_as_string(hide_password=False)


@contextlib.contextmanager
def private_database(dsn: str, name: str) -> Iterator[str]:
    """A database of its own for one scenario, dropped afterwards.

    Every connection to it is the scenario's, so faults can be aimed at "all of the
    library's connections" without touching other tests running on the same server.
    """
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield database_url(dsn, name)
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# -- the streams of a run ---------------------------------------------------------------

# Three wildcards: a plain prefix, an escaped underscore (so `ordX1` must not match, which
# `ord_%` would), and non-ASCII. Each has look-alike streams outside it.
WILDCARDS = ["acct-%", "ord\\_%", "konto-ü-%"]


def stream_names(count: int) -> tuple[list[str], list[str]]:
    """(matching, non-matching) stream names, about `count` in all."""
    matching = (
        [f"acct-{i}" for i in range(count * 5 // 10)]
        + [f"ord_{i}" for i in range(count * 15 // 100)]
        + [f"konto-ü-{i}" for i in range(count * 15 // 100)]
    )
    other = (
        [f"acctx-{i}" for i in range(count * 8 // 100)]
        + [f"ordX{i}" for i in range(count * 6 // 100)]
        + [f"konto-u-{i}" for i in range(count * 6 // 100)]
    )
    return matching, other


# -- processes ------------------------------------------------------------------------


@dataclasses.dataclass
class Worker:
    """One worker slot; each (re)start is a new incarnation with its own seed and log."""

    role: str
    name: str
    config: dict[str, Any]
    make_extra: Callable[[random.Random], dict[str, Any]] | None = None
    incarnation: int = 0
    process: BaseProcess | None = None
    logs: list[Path] = dataclasses.field(default_factory=list)
    exits: list[int] = dataclasses.field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def reap(self) -> int | None:
        """Join and release a finished process; return its exit code (None if running)."""
        if self.process is None or self.process.is_alive():
            return None
        self.process.join()
        code = self.process.exitcode
        assert code is not None
        self.process.close()
        self.process = None
        self.exits.append(code)
        return code

    @property
    def ready(self) -> bool:
        """The current incarnation has finished its setup."""
        log = self.logs[-1] if self.logs else None
        return log is not None and log.exists() and '"ev": "started"' in log.read_text()


def _context() -> Any:
    # A fork server with the worker module imported: cheap restarts. Never `fork` from
    # the test process itself (it has threads).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.chaos._workers"])
    return ctx


class Supervisor:
    """Starts, kills, restarts and stops worker processes; kills every one it started
    when closed (also when the test fails), and never leaves a pipe open."""

    def __init__(self, workdir: Path, seed: int, lifetime: float) -> None:
        self.workdir = workdir
        self.seed = seed
        self.lifetime = lifetime
        self.workers: list[Worker] = []
        self._ctx = _context()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stop_file(self, role: str) -> Path:
        return self.workdir / f"stop-{role}"

    def add(self, worker: Worker) -> Worker:
        self.workers.append(worker)
        self.start(worker)
        return worker

    def role(self, role: str) -> list[Worker]:
        return [w for w in self.workers if w.role == role]

    def start(self, worker: Worker) -> None:
        assert not worker.alive
        worker.incarnation += 1
        seed = derive_seed(self.seed, worker.name, worker.incarnation)
        config = dict(worker.config)
        if worker.make_extra is not None:
            config.update(worker.make_extra(random.Random(seed)))
        config.update(
            name=worker.name,
            incarnation=worker.incarnation,
            seed=seed,
            stop_file=str(self.stop_file(worker.role)),
            lifetime=self.lifetime,
        )
        log = self.workdir / f"{worker.name}.{worker.incarnation}.log"
        worker.logs.append(log)
        worker.process = self._ctx.Process(
            target=_workers.entry,
            args=(worker.role, json.dumps(config), str(log)),
            name=f"{worker.name}.{worker.incarnation}",
        )
        worker.process.start()

    def kill(self, worker: Worker) -> bool:
        """SIGKILL the worker (if running) and reap it."""
        if not worker.alive:
            return False
        assert worker.process is not None
        worker.process.kill()
        worker.process.join()
        worker.reap()
        return True

    def wait_ready(self, timeout: float) -> list[str]:
        """Wait until every running worker finished its setup; return the laggards."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            waiting = [w.name for w in self.workers if w.alive and not w.ready]
            if not waiting:
                return []
            time.sleep(0.05)
        return waiting

    def stop(self, role: str, timeout: float = 20.0) -> list[str]:
        """Ask every worker of `role` to stop; SIGKILL those still running after
        `timeout`. Returns the names of the workers that had to be killed."""
        self.stop_file(role).touch()
        deadline = time.monotonic() + timeout
        stuck: list[str] = []
        for worker in self.role(role):
            if worker.process is None:
                continue
            worker.process.join(max(0.1, deadline - time.monotonic()))
            if worker.process.is_alive():
                stuck.append(worker.name)
                worker.process.kill()
                worker.process.join()
            worker.reap()
        return stuck

    def close(self) -> None:
        for worker in self.workers:
            if worker.process is not None:
                if worker.process.is_alive():
                    worker.process.kill()
                worker.process.join()
                worker.reap()

    def events(self, role: str | None = None) -> Iterator[tuple[Worker, dict[str, Any]]]:
        """Every JSON event every incarnation logged (a torn last line is skipped)."""
        for worker in self.workers:
            if role is not None and worker.role != role:
                continue
            for log in worker.logs:
                if not log.exists():
                    continue
                for line in log.read_text(errors="replace").splitlines():
                    if line.startswith("{"):
                        with contextlib.suppress(ValueError):
                            yield worker, json.loads(line)

    def unexpected(self) -> list[str]:
        """Bugs: unexpected exceptions, and output that is not an event (a traceback
        printed by something else, a crash)."""
        found: list[str] = []
        for worker in self.workers:
            for log in worker.logs:
                if not log.exists():
                    continue
                for line in log.read_text(errors="replace").splitlines():
                    if not line.startswith("{"):
                        found.append(f"{log.name}: {line}")
                    elif '"unexpected"' in line:
                        with contextlib.suppress(ValueError):
                            event = json.loads(line)
                            found.append(
                                f"{log.name}: {event['error']} (SQLSTATE {event.get('sqlstate')})"
                                f"\n{event['tb']}"
                            )
        return found

    def bad_exits(self) -> list[str]:
        """Exits other than a clean stop (0) or our SIGKILL (-9)."""
        return [
            f"{w.name} exited with {code}"
            for w in self.workers
            for code in w.exits
            if code not in (0, -signal.SIGKILL)
        ]


# -- faults ---------------------------------------------------------------------------


class Saboteur:
    """Faults made from a connection of its own to the scenario's database (which only
    the scenario uses): `pg_terminate_backend` on the library's connections, and table
    locks that stall a projector between two statements of a batch."""

    TARGETS: ClassVar[dict[str, str]] = {
        "projector": "application_name LIKE 'depeche-rs projector%'",
        "subscription": "application_name = 'depeche-rs subscription'",
        "any": "true",
    }

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None
        self.terminations = 0
        self.stalls = 0

    def __enter__(self) -> Saboteur:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self._dsn, autocommit=True)
            self._conn.execute("SET lock_timeout = '2s'")
        return self._conn

    def _attempt(self, action: Callable[[psycopg.Connection[Any]], int]) -> int:
        try:
            return action(self._connection())
        except psycopg.OperationalError:
            # The server is restarting (restart scenario), or the lock was not granted.
            if self._conn is not None:
                self._conn.close()
            return 0

    def terminate(self, rng: random.Random, target: str, how_many: int | None) -> int:
        """Terminate up to `how_many` (None: all) backends matching `target`."""

        def action(conn: psycopg.Connection[Any]) -> int:
            pids = [
                pid
                for (pid,) in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    f"AND pid <> pg_backend_pid() AND {self.TARGETS[target]} ORDER BY pid"
                )
            ]
            if how_many is not None:
                pids = rng.sample(pids, min(how_many, len(pids)))
            done = 0
            for pid in pids:
                row = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
                done += bool(row and row[0])
            return done

        done = self._attempt(action)
        self.terminations += done
        return done

    def stall(self, table: str, seconds: float) -> int:
        """Hold `table` in EXCLUSIVE mode for `seconds`: a projector that already
        inserted its rows waits on its next write there (and hits its statement
        timeout, if it has one)."""

        def action(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                conn.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
                time.sleep(seconds)
            return 1

        done = self._attempt(action)
        self.stalls += done
        return done

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def in_batch(marker: str, within: float = 0.004) -> bool:
    """True if the marking partitioner touched `marker` within the last `within` s."""
    try:
        return time.time() - os.stat(marker).st_mtime < within
    except FileNotFoundError:
        return False
