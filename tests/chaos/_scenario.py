"""One chaos run: writers, projectors and subscribers in their own processes, a fault
injector killing and disconnecting them (and restarting PostgreSQL when the run owns
it), then a quiet phase and the verdict."""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from depeche_rs import MessageStore
from depeche_rs.tools import PydanticMessageSerializer, StreamHashPartitioner

from .._models import AnyEvent
from ._harness import (
    WILDCARDS,
    Saboteur,
    Settings,
    Supervisor,
    Worker,
    derive_seed,
    in_batch,
    stream_names,
)
from ._verdict import Ledger, Verdict, verify

STORE = "chaos"
AGG = "chaos_agg"
SIDE = "chaos_side"
DELIVERIES = "chaos_deliveries"
SUB_SINGLE = "chaos_single"
SUB_BATCHED = "chaos_batched"


@dataclasses.dataclass
class Plan:
    """The shape of a run."""

    seconds: float
    writers: int = 3
    streams: int = 300
    partitions: int = 8
    # Projector 0 partitions in Python and is the target of aimed mid-batch kills; with
    # `statement_timeout`, projector 1 runs with a few milliseconds of it.
    projectors: int = 3
    statement_timeout: bool = True
    subscribers_per_subscription: int = 2
    # Relative weights of the faults injected every 0.2-0.7 s.
    faults: dict[str, float] = dataclasses.field(
        default_factory=lambda: {
            "kill_projector": 2,
            "kill_projector_mid_batch": 2,
            "kill_subscriber": 1.5,
            "kill_subscriber_mid_batch": 1.5,
            "kill_writer": 1,
            "terminate_projector": 1.5,
            "terminate_subscription": 1.5,
            "terminate_any": 1.5,
            "terminate_all": 0.3,
            "stall_projection": 3,
        }
    )
    # Times (fractions of `seconds`) at which the server is restarted, if it can be.
    server_restarts: tuple[float, ...] = ()


class Scenario:
    """Runs a `Plan` against the database at `dsn` (which the run has to itself)."""

    def __init__(
        self,
        dsn: str,
        workdir: Path,
        settings: Settings,
        plan: Plan,
        restart_server: Callable[[], str] | None = None,
    ) -> None:
        self.dsn = dsn
        self.workdir = workdir
        self.settings = settings
        self.plan = plan
        self.restart_server = restart_server
        self.rng = random.Random(derive_seed(settings.seed, "injector", plan.seconds))
        self.matching, self.other = stream_names(plan.streams)
        self.faults: Counter[str] = Counter()
        self.restarts = 0
        self.timeline: list[str] = []
        lifetime = plan.seconds + 240
        self.supervisor = Supervisor(workdir, settings.seed, lifetime)
        self.saboteur = Saboteur(dsn)
        self.marker = str(workdir / "projector-0.inbatch")

    # -- setup ------------------------------------------------------------------------

    def _setup(self) -> None:
        store: MessageStore[AnyEvent] = MessageStore(
            STORE, self.dsn, PydanticMessageSerializer(AnyEvent)
        )
        store.aggregated_stream(AGG, StreamHashPartitioner(self.plan.partitions), WILDCARDS)
        store.engine.dispose()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {SIDE} (writer text, note text)")
            conn.execute(
                f"CREATE TABLE {DELIVERIES} (seq bigserial PRIMARY KEY, sub text, "
                "partition int, position bigint, message_id uuid, pid int, "
                "at timestamptz DEFAULT clock_timestamp())"
            )

    def _common(self) -> dict[str, Any]:
        return {
            "dsn": self.dsn,
            "store": STORE,
            "agg": AGG,
            "wildcards": WILDCARDS,
            "partitions": self.plan.partitions,
        }

    def _start_workers(self) -> None:
        plan, sup = self.plan, self.supervisor
        for i in range(plan.writers):
            sup.add(
                Worker(
                    "writer",
                    f"writer-{i}",
                    {
                        **self._common(),
                        "streams": self.matching + self.other,
                        "side_table": SIDE,
                        "pause": 0.01,
                        "long_sleep": 1.0,
                    },
                )
            )
        for i in range(plan.projectors):
            sup.add(Worker("projector", f"projector-{i}", self._common(), self._projector(i)))
        for name, strategy in ((SUB_SINGLE, "SINGLE"), (SUB_BATCHED, "BATCHED")):
            for i in range(plan.subscribers_per_subscription):
                batch = (3, 20) if strategy == "SINGLE" else (5, 50)
                sup.add(
                    Worker(
                        "subscriber",
                        f"{name}-{i}",
                        {
                            **self._common(),
                            "subscription": name,
                            "strategy": strategy,
                            "deliveries": DELIVERIES,
                            "poll": 0.05,
                            "marker": str(self.workdir / f"{name}-{i}.inbatch"),
                        },
                        lambda rng, batch=batch: {"batch_size": rng.randint(*batch)},
                    )
                )

    def _projector(self, index: int) -> Callable[[random.Random], dict[str, Any]]:
        def extra(rng: random.Random) -> dict[str, Any]:
            if index == 0:
                return {
                    "marker": self.marker,
                    "delay": 0.001,
                    "batch_size": rng.randint(10, 120),
                    "poll": 0.05,
                }
            config: dict[str, Any] = {"batch_size": rng.choice((7, 50, 300, 1000)), "poll": 0.1}
            if index == 1 and self.plan.statement_timeout:
                # The most eager projector, so that it is often the one a stall blocks.
                config["poll"] = 0.01
                # `--name=value`: depeche-rs turns the space of `-c name=value` into `+`
                # when it hands the DSN to the engine (test_dsn_options_with_spaces_...).
                ms = rng.choice((2, 3, 5, 8, 20))
                config["dsn"] = f"{self.dsn}?options=--statement_timeout%3D{ms}"
                config["statement_timeout"] = ms
            return config

        return extra

    # -- faults -----------------------------------------------------------------------

    def _restart_later(self, worker: Worker) -> None:
        time.sleep(self.rng.uniform(0, 0.3))
        self.supervisor.start(worker)

    def _kill(self, role: str, fault: str) -> None:
        workers = [w for w in self.supervisor.role(role) if w.alive]
        if workers and self.supervisor.kill(worker := self.rng.choice(workers)):
            self.faults[fault] += 1
            self._restart_later(worker)

    def _kill_mid_batch(self, role: str) -> None:
        """Kill a worker of `role` while it is inside a batch (its marker file was touched
        a moment ago), waiting up to 1.5 s for one to be; else kill one anyway."""
        markers = {
            w.name: (w, marker)
            for w in self.supervisor.role(role)
            if (marker := self._marker(w)) is not None
        }
        deadline = time.monotonic() + 1.5
        busy: list[str] = []
        while time.monotonic() < deadline and not busy:
            busy = [name for name, (_, marker) in markers.items() if in_batch(marker)]
            time.sleep(0.0005)
        worker = markers[self.rng.choice(sorted(busy or markers))][0]
        if self.supervisor.kill(worker):
            self.faults[f"kill_{role}_mid_batch" if busy else f"kill_{role}"] += 1
            self._restart_later(worker)

    def _marker(self, worker: Worker) -> str | None:
        if worker.role == "projector":
            return self.marker if worker.name == "projector-0" else None
        marker: str | None = worker.config.get("marker")
        return marker

    def _inject(self, fault: str) -> None:
        rng = self.rng
        if fault == "kill_projector":
            self._kill("projector", fault)
        elif fault in ("kill_projector_mid_batch", "kill_subscriber_mid_batch"):
            self._kill_mid_batch(fault.split("_")[1])
        elif fault == "kill_subscriber":
            self._kill("subscriber", fault)
        elif fault == "kill_writer":
            self._kill("writer", fault)
        elif fault == "stall_projection":
            table = rng.choice((f"depeche_stream_{AGG}_maxpos", f"depeche_stream_{AGG}_cursor"))
            self.faults[fault] += self.saboteur.stall(table, rng.uniform(0.05, 0.4))
        else:
            target = fault.removeprefix("terminate_")
            how_many = None if target == "all" else rng.randint(1, 3)
            done = self.saboteur.terminate(rng, "any" if target == "all" else target, how_many)
            self.faults[fault] += done

    def _restart(self) -> None:
        assert self.restart_server is not None
        started = time.monotonic()
        dsn = self.restart_server()
        assert dsn == self.dsn.split("?")[0], f"the server came back at {dsn}"
        self.restarts += 1
        self.timeline.append(f"restart {self.restarts} took {time.monotonic() - started:.1f}s")

    def _chaos(self) -> None:
        plan, rng = self.plan, self.rng
        started = time.monotonic()
        until = started + plan.seconds
        restarts = sorted(started + f * plan.seconds for f in plan.server_restarts)
        names = list(plan.faults)
        weights = [plan.faults[n] for n in names]
        while time.monotonic() < until:
            time.sleep(rng.uniform(0.2, 0.7))
            self._revive()
            if restarts and time.monotonic() >= restarts[0]:
                restarts.pop(0)
                self._restart()
                continue
            fault = rng.choices(names, weights)[0]
            self._inject(fault)
            # What happened when, next to the workers' logs (timestamps as theirs).
            with open(self.workdir / "injector.log", "a") as log:
                log.write(f"{time.time():.3f} {fault} {dict(self.faults)}\n")

    def _revive(self) -> None:
        """Restart workers that ended by themselves (their exit is reported as bad)."""
        for worker in self.supervisor.workers:
            if worker.reap() is not None:
                self.supervisor.start(worker)

    # -- quiet phase ------------------------------------------------------------------

    def _wait(
        self, what: str, done: Callable[[psycopg.Connection[Any]], bool], limit: float
    ) -> bool:
        started = time.monotonic()
        deadline = started + limit
        stable = 0
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while time.monotonic() < deadline:
                self._revive()
                stable = stable + 1 if done(conn) else 0
                if stable >= 3:
                    self.timeline.append(f"{what} after {time.monotonic() - started:.1f}s")
                    return True
                time.sleep(0.2)
        self.timeline.append(f"{what}: not after {limit:.0f}s")
        return False

    def _projection_done(self, conn: psycopg.Connection[Any]) -> bool:
        row = conn.execute(
            f"SELECT (SELECT count(*) FROM depeche_msgs_{STORE} WHERE stream LIKE ANY(%s)), "
            f"(SELECT count(*) FROM depeche_stream_{AGG})",
            (WILDCARDS,),
        ).fetchone()
        return row is not None and row[0] == row[1]

    def _subscriptions_done(self, conn: psycopg.Connection[Any]) -> bool:
        maxpos = dict(
            conn.execute(f"SELECT partition, max_position FROM depeche_stream_{AGG}_maxpos")
        )
        for name in (SUB_SINGLE, SUB_BATCHED):
            try:
                state = dict(
                    conn.execute(
                        f"SELECT partition, position FROM depeche_subscriptions_{name} "
                        "WHERE partition >= 0"
                    )
                )
            except psycopg.errors.UndefinedTable:
                return False  # no subscriber got as far as creating its state
            if state != maxpos:
                return False
        return True

    # -- the run ----------------------------------------------------------------------

    def run(self) -> Verdict:
        started = time.monotonic()
        self._setup()
        with self.supervisor, self.saboteur:
            self._start_workers()
            laggards = self.supervisor.wait_ready(60)
            assert not laggards, f"workers not ready after 60 s: {laggards}"
            self._chaos()
            stuck = self.supervisor.stop("writer")
            self._wait("projection complete", self._projection_done, 45)
            self._wait("subscriptions caught up", self._subscriptions_done, 45)
            stuck += self.supervisor.stop("projector") + self.supervisor.stop("subscriber")
            final = self._final_update()
            verdict = self._verdict()
        verdict.problems += self.supervisor.unexpected() + self.supervisor.bad_exits()
        if stuck:
            verdict.problems.append(f"did not stop when asked: {stuck}")
        if final != (0, False):
            verdict.problems.append(f"a last update_full after the run projected {final}")
        verdict.figures["seconds"] = round(time.monotonic() - started, 1)
        self.timeline.append(f"faults {dict(sorted(self.faults.items()))}")
        return verdict

    def _final_update(self) -> tuple[int, bool]:
        store: MessageStore[AnyEvent] = MessageStore(
            STORE, self.dsn, PydanticMessageSerializer(AnyEvent)
        )
        stream = store.aggregated_stream(
            AGG, StreamHashPartitioner(self.plan.partitions), WILDCARDS
        )
        try:
            n, more = stream.projector.update_full()
        finally:
            stream.projector.close()
            store.engine.dispose()
        return n, more

    def _verdict(self) -> Verdict:
        from depeche_rs import _native

        partitions = self.plan.partitions
        verdict = verify(
            self.dsn,
            STORE,
            AGG,
            partitions,
            set(self.matching),
            Ledger.read(self.supervisor),
            # SINGLE acknowledges in the handler's transaction: its recorded deliveries
            # commit with the acknowledgement, so each message is recorded exactly once.
            {SUB_SINGLE: True, SUB_BATCHED: False},
            DELIVERIES,
            lambda stream: _native.hash_mod_partition(stream, partitions),
        )
        kills = sum(v for k, v in self.faults.items() if k.startswith("kill"))
        terminations = self.saboteur.terminations
        timeouts = sum(
            1
            for _, e in self.supervisor.events("projector")
            if e.get("ev") == "fault" and e.get("kind") == "statement_timeout"
        )
        connection_faults = sum(
            1
            for _, e in self.supervisor.events()
            if e.get("ev") == "fault" and e.get("kind") == "connection"
        )
        figures = verdict.figures
        head = {k: figures.pop(k) for k in list(figures)[:5]}
        verdict.figures = {
            **head,
            "kills": kills,
            "terminations": terminations,
            **figures,
            "mid_batch_kills": self.faults["kill_projector_mid_batch"]
            + self.faults["kill_subscriber_mid_batch"],
            "stalls": self.saboteur.stalls,
            "statement_timeouts": timeouts,
            "connection_faults": connection_faults,
            "restarts": self.restarts,
            "seed": self.settings.seed,
        }
        return verdict
