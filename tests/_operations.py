"""Helpers of the projector-under-operations tests: the full-outcome checker, writing
messages, private databases, PostgreSQL's client programs and transaction-id burning."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import depeche_rs
from depeche_rs._connection import sqlalchemy_url

from ._helpers import projected_rows
from ._models import AnyEvent, Deposited

Store = depeche_rs.MessageStore[AnyEvent]


def write(store: Store, *streams: str, conn: sa.Connection | None = None) -> list[uuid.UUID]:
    """Write one message to each of `streams`, in order; return their message ids."""
    ids = []
    for stream in streams:
        event = Deposited(account=len(ids), amount=1)
        store.write(stream, event, conn=conn)
        ids.append(event.event_id)
    return ids


def write_mixed(store: Store, engine: sa.Engine, worker: int, rounds: int) -> None:
    """`rounds` rounds of writes to `acc-`, `loan-` and `other-` streams of `worker`;
    every tenth round writes two streams in one transaction, every other one rolled back."""
    for i in range(rounds):
        streams = (f"acc-{worker}{i % 6}", f"loan-{worker}{i % 3}", f"other-{worker}")
        if i % 10:
            write(store, *streams)
            continue
        with engine.connect() as conn:
            write(store, *streams[:2], conn=conn)
            if i % 20:
                conn.commit()
            else:
                conn.rollback()


def depeche_db_store(store: Store) -> Any:
    """depeche-db 0.13.1's own MessageStore on the same tables."""
    depeche_db = pytest.importorskip("depeche_db")
    db_tools = pytest.importorskip("depeche_db.tools")
    return depeche_db.MessageStore(
        store.name, store.engine, db_tools.PydanticMessageSerializer(AnyEvent)
    )


def depeche_db_stream(store: Store, name: str, wildcards: list[str]) -> Any:
    """depeche-db's own AggregatedStream `name` (its projector, its truncate), with its
    StreamNamePartitioner, on the same tables."""
    db_tools = pytest.importorskip("depeche_db.tools")
    return depeche_db_store(store).aggregated_stream(
        name=name, partitioner=db_tools.StreamNamePartitioner(), stream_wildcards=wildcards
    )


def _messages(engine: sa.Engine, store: str, wildcards: Sequence[str]) -> dict[uuid.UUID, Any]:
    """Every committed message of `store`: id -> (stream, version, global position, matches)."""
    with engine.connect() as conn:
        return {
            r[0]: r[1:]
            for r in conn.exec_driver_sql(
                "SELECT message_id, stream, version, global_position, "
                "       stream::text LIKE ANY(%s::text[]) "
                f"FROM depeche_msgs_{store}",
                (list(wildcards),),
            )
        }


def assert_projection(
    engine: sa.Engine,
    store: str,
    agg: str,
    wildcards: Sequence[str],
    *,
    unprojected: Collection[uuid.UUID] = (),
    first_positions: Mapping[int, int] | None = None,
) -> list[Any]:
    """Assert the whole outcome of projecting `store` into `agg` and return its rows.

    - The aggregated table holds exactly the committed messages whose stream matches one
      of `wildcards` (minus `unprojected`, which must match), each exactly once.
    - Each partition's positions are gapless, from `first_positions[partition]` (0 when
      not given: a fresh stream), and `_maxpos` holds each partition's last position.
    - Each row's origin columns are its message's, and within a partition each origin
      stream's versions increase with the position.
    """
    messages = _messages(engine, store, wildcards)
    matching = {m for m, (*_, matches) in messages.items() if matches}
    assert set(unprojected) <= matching, "an expected-unprojected message does not match"
    expected = matching - set(unprojected)
    rows = projected_rows(engine, agg)
    ids = [r[0] for r in rows]

    def named(which: Collection[uuid.UUID]) -> str:
        """The first few of `which` as (stream, version), and how many there are."""
        names = sorted(messages.get(m, (str(m),))[:2] for m in which)
        return f"{len(names)} {names[:12]}{' ...' if len(names) > 12 else ''}"

    twice = [m for m, n in Counter(ids).items() if n > 1]
    assert not twice, f"projected more than once: {named(twice)}"
    lost, extra = expected - set(ids), set(ids) - expected
    assert not lost and not extra, f"lost {named(lost)}; projected but not expected {named(extra)}"

    with engine.connect() as conn:
        maxpos = dict(
            conn.exec_driver_sql(
                f"SELECT partition, max_position FROM depeche_stream_{agg}_maxpos"
            ).all()
        )
    by_partition: dict[int, list[Any]] = {}
    for r in rows:
        assert (r[1], r[2], r[6]) == messages[r[0]][:3], f"origin columns differ: {r}"
        by_partition.setdefault(r[3], []).append(r)
    assert set(maxpos) == set(by_partition), f"_maxpos {maxpos} for partitions {by_partition}"
    for partition, prows in by_partition.items():
        first = (first_positions or {}).get(partition, 0)
        positions = [r[4] for r in prows]
        assert positions == list(range(first, first + len(prows))), (
            f"partition {partition}: positions {positions} are not gapless from {first}"
        )
        assert maxpos[partition] == positions[-1]
        last: dict[str, int] = {}
        for r in prows:
            assert r[2] > last.get(r[1], 0), f"partition {partition}: {r[1]} out of version order"
            last[r[1]] = r[2]
    return rows


def projected_streams(engine: sa.Engine, agg: str) -> list[tuple[str, int]]:
    """(origin stream, version) of every projected row, sorted."""
    return sorted((r[1], r[2]) for r in projected_rows(engine, agg))


def database_url(dsn: str, database: str) -> str:
    """`dsn` pointing at another database of the same server."""
    return sa.make_url(dsn).set(database=database).render_as_string(hide_password=False)


@contextlib.contextmanager
def private_database(dsn: str, name: str) -> Iterator[str]:
    """A new database on `dsn`'s server, dropped (connections and all) afterwards."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield database_url(dsn, name)
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def engine_for(dsn: str) -> Iterator[sa.Engine]:
    """A SQLAlchemy engine on `dsn`, disposed afterwards."""
    engine = sa.create_engine(sqlalchemy_url(dsn))
    try:
        yield engine
    finally:
        engine.dispose()


@contextlib.contextmanager
def private_cluster(prefix: str, settings: Mapping[str, str] = {}) -> Iterator[str]:
    """A PostgreSQL cluster of its own (the embedded server) with `settings` applied by
    a restart; stopped and removed afterwards. Not under pytest's base temp: a pytest
    session starting meanwhile resets that directory to 0700, cutting off a server run
    by another account."""
    from depeche_rs._embedded import start_embedded, stop_embedded

    root = Path(tempfile.mkdtemp(prefix=prefix))
    data_dir = root / "pgdata"
    try:
        dsn = start_embedded(data_dir)
        if settings:
            with psycopg.connect(dsn, autocommit=True) as conn:
                for name, value in settings.items():
                    conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
            stop_embedded(data_dir)
            dsn = start_embedded(data_dir)
        yield dsn
    finally:
        stop_embedded(data_dir)
        shutil.rmtree(root, ignore_errors=True)


def current_xid(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_xact_id()::text::int8").fetchone()
    assert row is not None
    return int(row[0])


def burn_xids_until(dsn: str, xid: int) -> None:
    """Consume transaction ids on `dsn`'s cluster until the next one is above `xid`
    (subtransactions, 50 000 per statement: a fraction of a second)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE burn (x int)")
        while current_xid(dsn) <= xid:
            conn.execute(
                "DO $$ BEGIN FOR i IN 1..50000 LOOP BEGIN INSERT INTO burn VALUES (1); "
                "RAISE EXCEPTION 'burn'; EXCEPTION WHEN raise_exception THEN NULL; END; "
                "END LOOP; END $$"
            )


def pg_program(name: str) -> Path:
    """A client program shipped with the embedded server (pg_dump, pg_restore, ...)."""
    from depeche_rs._embedded import _wheel_bin_dir

    return _wheel_bin_dir() / name


def run_pg_program(
    name: str, *args: str | Path, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL client program; with `check`, fail with its output unless it
    exits with 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    result = subprocess.run(
        [str(pg_program(name)), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    if check:
        assert result.returncode == 0, f"{name} failed ({result.returncode}):\n{result.stderr}"
    return result


def run_concurrently(
    writers: Sequence[Callable[[], None]], loops: Sequence[Callable[[], Any]]
) -> None:
    """Run each of `writers` once, in threads, while each of `loops` runs repeatedly in a
    thread of its own; stop the loops when the writers are done; re-raise the first error."""
    done = threading.Event()
    errors: list[BaseException] = []

    def guarded(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
            except BaseException as exc:
                errors.append(exc)

        return run

    def repeated(work: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            while not done.is_set():
                work()

        return run

    writing = [threading.Thread(target=guarded(w)) for w in writers]
    looping = [threading.Thread(target=guarded(repeated(w))) for w in loops]
    for thread in writing + looping:
        thread.start()
    for thread in writing:
        thread.join()
    done.set()
    for thread in looping:
        thread.join()
    if errors:
        raise errors[0]
