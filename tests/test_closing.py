"""Closing: `engine.dispose()` and `MessageStore.close()` close every connection we opened
(projector, subscription readers and locks, stream readers' listeners), so a database
can be dropped right after, without FORCE."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
import sqlalchemy as sa

from depeche_rs import MessageStore
from depeche_rs._connection import sqlalchemy_url
from depeche_rs.tools import DbLockProvider, PydanticMessageSerializer, StreamHashPartitioner

from ._models import AnyEvent, Deposited
from ._operations import database_url


@pytest.fixture()
def database(dsn: str) -> Iterator[tuple[str, str]]:
    """A fresh database: (name, libpq URL); forced away afterwards whatever happened."""
    name = "close_" + uuid.uuid4().hex[:12]
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield name, database_url(dsn, name)
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _sessions(dsn: str, database: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def _eventually(read: Callable[[], object], expected: object) -> None:
    """A closed client's backend leaves pg_stat_activity a moment later: wait for it."""
    deadline = time.monotonic() + 5
    while (got := read()) != expected:
        assert time.monotonic() < deadline, f"{got!r} != {expected!r}"
        time.sleep(0.02)


def _drop(dsn: str, database: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {database}")


def _use_everything(store: MessageStore[AnyEvent], first: int) -> list[object]:
    """Write, project, read by subscription (with its own and a given lock provider) and
    by a live stream reader; return what must stay alive (so no collection closes it)."""
    for amount in range(first, first + 5):
        store.write(f"acc-{amount % 2}", Deposited(account=amount % 2, amount=amount))
    agg = store.aggregated_stream("agg", StreamHashPartitioner(2), ["acc-%"])
    assert agg.projector.update_full() == (5, False)
    subscription = agg.subscription("sub")
    got = [m.stored_message.message.amount for m in subscription.get_next_messages(10)]
    locks = DbLockProvider("other", store.engine)
    assert locks.lock("x")
    given = agg.subscription("sub_given", lock_provider=locks)
    got_given = [m.stored_message.message.amount for m in given.get_next_messages(10)]
    assert sorted(got) == sorted(got_given) == list(range(first, first + 5))
    reader = agg.reader()
    reader.start()
    return [agg, subscription, locks, given, reader]


def test_dispose_closes_every_connection_and_drop_database_succeeds(
    dsn: str, database: tuple[str, str]
) -> None:
    name, url = database
    engine = sa.create_engine(sqlalchemy_url(url))
    store: MessageStore[AnyEvent] = MessageStore(
        "store", engine, PydanticMessageSerializer(AnyEvent)
    )
    alive = _use_everything(store, 0)
    assert _sessions(dsn, name) >= 4
    engine.dispose()
    _eventually(lambda: _sessions(dsn, name), 0)
    # Everything reopens on use, and the next dispose finds it again.
    alive += _use_everything(store, 5)
    assert _sessions(dsn, name) >= 4
    engine.dispose()
    _eventually(lambda: _sessions(dsn, name), 0)
    _drop(dsn, name)
    assert alive and store.name == "store"


def test_store_close_and_context_manager_close_every_connection(
    dsn: str, database: tuple[str, str]
) -> None:
    name, url = database
    with MessageStore("store", url, PydanticMessageSerializer(AnyEvent)) as store:
        alive = _use_everything(store, 0)
        assert _sessions(dsn, name) >= 4
    _eventually(lambda: _sessions(dsn, name), 0)
    _drop(dsn, name)
    assert alive


def _applications(dsn: str, database: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT application_name, query FROM pg_stat_activity WHERE datname = %s ORDER BY 1",
            (database,),
        ).fetchall()
    return [(str(a), str(q)) for a, q in rows]


def test_closing_one_store_leaves_another_on_the_same_engine_open(
    dsn: str, database: tuple[str, str]
) -> None:
    name, url = database
    engine = sa.create_engine(sqlalchemy_url(url))
    serializer = PydanticMessageSerializer(AnyEvent)
    closed: MessageStore[AnyEvent] = MessageStore("closed", engine, serializer)
    kept: MessageStore[AnyEvent] = MessageStore("kept", engine, serializer)
    kept_agg = kept.aggregated_stream("kagg", StreamHashPartitioner(1), ["acc-%"])
    kept.write("acc-1", Deposited(account=1, amount=1))
    assert kept_agg.projector.update_full() == (1, False)
    alive = _use_everything(closed, 0)
    closed.close()
    # The pool alone (no engine_disposed event): what is left is the kept store's
    # projector and the lock provider the test made itself (not the store's to close).
    engine.pool.dispose()
    # (Their last statements, up to the parenthesis: the projector's releases its lock,
    # whose key is the aggregated table's OID.)
    _eventually(
        lambda: [(app, query.split("(")[0]) for app, query in _applications(dsn, name)],
        [
            ("", "SELECT pg_try_advisory_lock"),
            ("depeche-rs projector depeche_stream_kagg", "SELECT pg_advisory_unlock"),
        ],
    )
    engine.dispose()
    _eventually(lambda: _sessions(dsn, name), 0)
    kept.write("acc-1", Deposited(account=1, amount=2))
    assert kept_agg.projector.update_full() == (1, False)
    kept.close()
    engine.pool.dispose()
    _eventually(lambda: _sessions(dsn, name), 0)
    _drop(dsn, name)
    assert alive


class _CyclicOwner:
    """An owner only the cyclic garbage collector frees (it refers to itself)."""

    def __init__(self) -> None:
        self.me = self
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_owners_survive_the_collector_running_inside_their_own_calls() -> None:
    # CI hung here once: a weakref callback, run by a collection that `add` itself set
    # off, waited for the lock `add` held. With the collector forced to run on nearly
    # every allocation, owners dying in cycles while others register must neither
    # deadlock nor leave dead entries behind.
    import gc
    import threading

    from depeche_rs._connection import ConnectionOwners

    owners = ConnectionOwners()
    kept = [_CyclicOwner() for _ in range(5)]
    outcome: list[str] = []

    def churn() -> None:
        threshold = gc.get_threshold()
        gc.set_threshold(1, 1, 1)
        try:
            for owner in kept:
                owners.add(owner.close)
            for _ in range(2000):
                owners.add(_CyclicOwner().close)
            owners.close_all()
        finally:
            gc.set_threshold(*threshold)
        gc.collect()
        outcome.append("done")

    worker = threading.Thread(target=churn, daemon=True)
    worker.start()
    worker.join(60)
    assert outcome == ["done"], "ConnectionOwners deadlocked under garbage collection"
    assert len(owners) == len(kept)
    assert [owner.closed for owner in kept] == [1] * len(kept)
