"""Chaos worker processes, started by the supervisor through a fork server that has this
module (so the library, SQLAlchemy, psycopg and pydantic) imported already: a restart
after a SIGKILL costs milliseconds, not a second and a half of imports.

Each worker drives the real library against real PostgreSQL and reports what it did as
JSON lines on stdout (its own log file), flushed line by line so a SIGKILL loses at most
the line being written. Roles:

- `writer`: transactions of 1-3 messages on random streams, some taking their
  transaction id early (an unrelated row first), random sleeps before commit, about 10%
  rolled back, some savepoints rolled back inside committed transactions. The ledger
  lines (`pending` just before COMMIT, then `committed`, `rolled_back` or `unknown`) are
  what the final check compares the tables with.
- `projector`: `update_full()` in a loop; optionally with a Python partitioner that
  touches a marker file while a batch is being partitioned (so the supervisor can kill
  it mid-batch) and with a `statement_timeout` in its DSN.
- `subscriber`: `subscription.runner.run_once()` in a loop; handlers record every
  delivery in a table: with SINGLE ack in the same transaction as the acknowledgement
  (`ack.execute(conn=...)`), with BATCHED ack on an autocommit connection (at least once).

Faults the library is expected to report (lost connections, a statement timeout, a
deadlock between writers, an acknowledgement in the handler's transaction refused because
another consumer made it first) are logged as `fault` events and the loop goes on with the
same objects; anything else is an `unexpected` event, which fails the test.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import sqlalchemy as sa

import depeche_rs
from depeche_rs import AckStrategy, MessageHandlerRegister, MessageStore, SubscriptionMessage
from depeche_rs.tools import PydanticMessageSerializer, StreamHashPartitioner

from .._models import AnyEvent, Deposited

T = TypeVar("T")
Config = dict[str, Any]


def emit(**event: Any) -> None:
    """One JSON line on stdout, flushed at once (survives a later SIGKILL)."""
    event["t"] = round(time.time(), 3)
    sys.stdout.write(json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


def stopping(cfg: Config) -> bool:
    """Stop file present, lifetime over, or the supervisor gone."""
    return (
        os.path.exists(cfg["stop_file"])
        or time.monotonic() > cfg["_deadline"]
        or os.getppid() != cfg["parent_pid"]
    )


def classify(exc: BaseException) -> str | None:
    """The kind of an expected fault, or None for a bug."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        sqlstate = getattr(current, "sqlstate", None) or ""
        if sqlstate == "57014" or isinstance(current, psycopg.errors.QueryCanceled):
            return "statement_timeout"
        if sqlstate == "40P01" or isinstance(current, psycopg.errors.DeadlockDetected):
            return "deadlock"
        if isinstance(current, depeche_rs.AckRolledback):
            # Another consumer acknowledged the message first (our partition lock went
            # with a lost connection): the handler's transaction rolls back.
            return "ack_conflict"
        if isinstance(current, depeche_rs.DatabaseConnectionError | psycopg.InterfaceError):
            return "connection"
        # A session ended by the server (terminated, shut down, starting up) or a
        # connection lost on the client side (no SQLSTATE); not any other server error.
        if isinstance(current, psycopg.OperationalError) and (
            not sqlstate or sqlstate[:2] == "08" or sqlstate in ("57P01", "57P02", "57P03")
        ):
            return "connection"
        if isinstance(current, sa.exc.DBAPIError) and current.connection_invalidated:
            return "connection"
        current = current.__cause__ or current.__context__
    return None


def report(exc: BaseException, where: str) -> str | None:
    """Log a caught exception; return its fault kind (None: unexpected)."""
    kind = classify(exc)
    sqlstate = getattr(exc, "sqlstate", None)
    if kind is None:
        emit(
            ev="unexpected",
            where=where,
            error=repr(exc),
            sqlstate=sqlstate,
            detail=getattr(exc, "detail", None),
            tb=traceback.format_exc(),
        )
        time.sleep(0.1)
    else:
        emit(
            ev="fault",
            kind=kind,
            where=where,
            sqlstate=sqlstate,
            error=(str(exc).splitlines() or [""])[0][:200],
        )
    return kind


def retry(cfg: Config, where: str, make: Callable[[], T]) -> T | None:
    """`make()`, retried with backoff while faults are expected; None when stopping."""
    delay = 0.05
    while not stopping(cfg):
        try:
            return make()
        except Exception as exc:
            report(exc, where)
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    return None


def open_store(cfg: Config) -> MessageStore[AnyEvent] | None:
    return retry(
        cfg,
        "store",
        lambda: MessageStore(cfg["store"], cfg["dsn"], PydanticMessageSerializer(AnyEvent)),
    )


def seeded_uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


# -- writer ---------------------------------------------------------------------------


def run_writer(cfg: Config) -> None:
    rng = random.Random(cfg["seed"])
    store = open_store(cfg)
    if store is None:
        return
    engine = store.engine
    streams: list[str] = cfg["streams"]
    emit(ev="started")
    tx = 0
    while not stopping(cfg):
        tx += 1
        tag = f"{cfg['name']}.{cfg['incarnation']}.{tx}"
        plan = [
            (rng.choice(streams), Deposited(event_id=seeded_uuid(rng), account=tx, amount=i))
            for i in range(rng.choice((1, 1, 2, 3)))
        ]
        try:
            if rng.random() < 0.15:
                # Own transaction (the store commits): one write_many on one stream.
                stream = plan[0][0]
                ids = [str(m.event_id) for _, m in plan]
                emit(ev="pending", tx=tag, ids=ids)
                try:
                    store.write_many(stream, [m for _, m in plan])
                except Exception:
                    emit(ev="unknown", tx=tag)
                    raise
                emit(ev="committed", tx=tag)
            else:
                write_transaction(cfg, rng, store, engine, tag, plan)
        except Exception as exc:
            report(exc, "write")
            time.sleep(0.02)
        time.sleep(rng.uniform(0, cfg["pause"]))


def write_transaction(
    cfg: Config,
    rng: random.Random,
    store: MessageStore[AnyEvent],
    engine: sa.Engine,
    tag: str,
    plan: list[tuple[str, Deposited]],
) -> None:
    kept: list[str] = []
    attempted: list[str] = []
    committing = False
    try:
        with engine.connect() as conn:
            if rng.random() < 0.3:
                # Take a transaction id (and hold it) long before the message.
                conn.exec_driver_sql(
                    f"INSERT INTO {cfg['side_table']} (writer, note) VALUES (%s, %s)",
                    (cfg["name"], tag),
                )
                conn.exec_driver_sql("SELECT pg_current_xact_id()")
                time.sleep(rng.uniform(0, 0.15))
            for stream, message in plan:
                mid = str(message.event_id)
                attempted.append(mid)
                if rng.random() < 0.05:
                    savepoint = conn.begin_nested()
                    store.write(stream, message, conn=conn)
                    savepoint.rollback()
                    emit(ev="rolled_back", tx=tag, ids=[mid], savepoint=True)
                else:
                    store.write(stream, message, conn=conn)
                    kept.append(mid)
                if rng.random() < 0.3:
                    time.sleep(rng.uniform(0, 0.02))
            roll = rng.random()
            time.sleep(
                0.0
                if roll < 0.5
                else rng.uniform(0, 0.02)
                if roll < 0.92
                else rng.uniform(0.2, cfg["long_sleep"])
            )
            if rng.random() < 0.1:
                emit(ev="rolled_back", tx=tag, ids=kept)
                kept = []
                conn.rollback()
                return
            emit(ev="pending", tx=tag, ids=kept)
            committing = True
            conn.commit()
            emit(ev="committed", tx=tag)
    except Exception:
        if committing:
            # COMMIT was sent: it may or may not have happened.
            emit(ev="unknown", tx=tag)
        elif kept or attempted:
            # Never committed: the server rolled it back.
            emit(ev="rolled_back", tx=tag, ids=sorted(set(attempted)))
        raise


# -- projector ------------------------------------------------------------------------


class MarkingPartitioner(StreamHashPartitioner[AnyEvent]):
    """The numbers of `StreamHashPartitioner`, computed in Python (so the engine calls
    back once per batch, inside the batch's transaction), touching a marker file and
    sleeping a little per message: the supervisor aims kills at batches in progress."""

    def __init__(self, partitions: int, marker: str, delay: float) -> None:
        super().__init__(partitions)
        self._marker = marker
        self._delay = delay
        with open(marker, "a"):
            pass

    def get_partition(self, message: Any) -> int:
        os.utime(self._marker)
        time.sleep(self._delay)
        return super().get_partition(message)


def run_projector(cfg: Config) -> None:
    rng = random.Random(cfg["seed"])
    store = open_store(cfg)
    if store is None:
        return
    partitioner: StreamHashPartitioner[AnyEvent]
    if cfg.get("marker"):
        partitioner = MarkingPartitioner(cfg["partitions"], cfg["marker"], cfg["delay"])
    else:
        partitioner = StreamHashPartitioner(cfg["partitions"])
    stream = retry(
        cfg,
        "aggregated_stream",
        lambda: store.aggregated_stream(
            cfg["agg"], partitioner, cfg["wildcards"], update_batch_size=cfg["batch_size"]
        ),
    )
    if stream is None:
        return
    emit(ev="started", batch_size=cfg["batch_size"])
    projected = 0
    last_report = time.monotonic()
    while not stopping(cfg):
        n = 0
        try:
            n, _more = stream.projector.update_full()
            projected += n
        except Exception as exc:
            report(exc, "update_full")
            time.sleep(0.02)
        now = time.monotonic()
        if now - last_report > 1.0:
            emit(ev="projected", n=projected)
            last_report = now
        if n == 0:
            time.sleep(rng.uniform(0.005, cfg["poll"]))
    emit(ev="projected", n=projected)


# -- subscriber -----------------------------------------------------------------------


class Recorder:
    """An autocommit connection recording deliveries (BATCHED: at least once)."""

    def __init__(self, dsn: str, table: str) -> None:
        self._dsn = dsn
        self._sql = (
            f"INSERT INTO {table} (sub, partition, position, message_id, pid) "
            "VALUES (%s, %s, %s, %s, %s)"
        )
        self._conn: psycopg.Connection[Any] | None = None

    def record(self, sub: str, message: SubscriptionMessage[Any]) -> None:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._dsn, autocommit=True)
        params = (
            sub,
            message.partition,
            message.position,
            message.stored_message.message_id,
            os.getpid(),
        )
        try:
            self._conn.execute(self._sql, params)
        except Exception:
            self._conn.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def run_subscriber(cfg: Config) -> None:
    rng = random.Random(cfg["seed"])
    store = open_store(cfg)
    if store is None:
        return
    stream = retry(
        cfg,
        "aggregated_stream",
        lambda: store.aggregated_stream(
            cfg["agg"], StreamHashPartitioner(cfg["partitions"]), cfg["wildcards"]
        ),
    )
    if stream is None:
        return
    engine = store.engine
    name = cfg["subscription"]
    record_sql = (
        f"INSERT INTO {cfg['deliveries']} (sub, partition, position, message_id, pid) "
        "VALUES (%s, %s, %s, %s, %s)"
    )
    recorder = Recorder(cfg["dsn"], cfg["deliveries"])
    handlers: MessageHandlerRegister[AnyEvent] = MessageHandlerRegister()
    handled = 0
    marker = cfg["marker"]
    with open(marker, "a"):
        pass

    if cfg["strategy"] == "SINGLE":

        @handlers.register
        def handle_in_transaction(message: SubscriptionMessage[AnyEvent]) -> None:
            nonlocal handled
            os.utime(marker)
            with engine.connect() as conn:
                conn.exec_driver_sql(
                    record_sql,
                    (
                        name,
                        message.partition,
                        message.position,
                        message.stored_message.message_id,
                        os.getpid(),
                    ),
                )
                message.ack.execute(conn=conn)
                conn.commit()
            handled += 1

    else:

        @handlers.register
        def handle_at_least_once(message: SubscriptionMessage[AnyEvent]) -> None:
            nonlocal handled
            os.utime(marker)
            recorder.record(name, message)
            handled += 1

    subscription = retry(
        cfg,
        "subscription",
        lambda: stream.subscription(
            name,
            handlers=handlers,
            batch_size=cfg["batch_size"],
            ack_strategy=getattr(AckStrategy, cfg["strategy"]),
        ),
    )
    if subscription is None:
        return
    emit(ev="started", strategy=cfg["strategy"], batch_size=cfg["batch_size"])
    last_report = time.monotonic()
    try:
        while not stopping(cfg):
            before = handled
            try:
                subscription.runner.run_once()
            except Exception as exc:
                report(exc, "run_once")
                time.sleep(0.02)
            now = time.monotonic()
            if now - last_report > 1.0:
                emit(ev="handled", n=handled)
                last_report = now
            if handled == before:
                time.sleep(rng.uniform(0.005, cfg["poll"]))
    finally:
        subscription.close()
        recorder.close()
    emit(ev="handled", n=handled)


ROLES: dict[str, Callable[[Config], None]] = {
    "writer": run_writer,
    "projector": run_projector,
    "subscriber": run_subscriber,
}


def entry(role: str, raw: str, log: str) -> None:
    """The process target: output to `log`, then run the role until told to stop."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = sys.stdout
    cfg: Config = json.loads(raw)
    cfg["_deadline"] = time.monotonic() + cfg["lifetime"]
    # The fork server is our parent; if it goes (the test run died), so do we.
    cfg["parent_pid"] = os.getppid()
    emit(ev="begin", role=role, name=cfg["name"], pid=os.getpid())
    try:
        ROLES[role](cfg)
    except Exception as exc:
        emit(ev="unexpected", where="main", error=repr(exc), tb=traceback.format_exc())
        raise
    emit(ev="end")
