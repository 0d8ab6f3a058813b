"""A store copied by real logical replication: the subscriber projects every row the
apply worker (and the initial table copy) brings, however late the publisher's
transaction committed, because its `tx` is stamped with the subscriber's own ids.

Runs on a private embedded cluster with `wal_level = logical`; the publisher and the
subscriber are two databases of it (the replication slot is created beforehand, as
PostgreSQL requires within one cluster).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from depeche_rs import AggregatedStream, MessageStore
from depeche_rs.tools import PydanticMessageSerializer, StreamHashPartitioner

from ._models import AnyEvent
from ._operations import (
    Store,
    assert_projection,
    burn_xids_until,
    current_xid,
    engine_for,
    private_cluster,
    private_database,
    write,
)

WILDCARDS = ["acc-%"]


@pytest.fixture(scope="module")
def logical_cluster() -> Iterator[str]:
    """A private cluster with `wal_level = logical`."""
    with private_cluster("depeche-rs-logical-", {"wal_level": "logical"}) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
        yield dsn


def _open(engine: sa.Engine, name: str, agg: str) -> tuple[Store, AggregatedStream[AnyEvent]]:
    store = MessageStore(name, engine, PydanticMessageSerializer(AnyEvent))
    return store, store.aggregated_stream(agg, StreamHashPartitioner(3), WILDCARDS, 7)


def _tx_of(dsn: str, table: str) -> dict[uuid.UUID, int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f"SELECT message_id, tx::text::int8 FROM {table}").fetchall()
    return {r[0]: r[1] for r in rows}


def _wait_until_replicated(publisher: str, subscriber: str, table: str) -> None:
    """Until the subscriber holds exactly the publisher's message ids (bounded)."""
    want = set(_tx_of(publisher, table))
    for _ in range(600):
        if set(_tx_of(subscriber, table)) == want:
            return
        time.sleep(0.05)
    raise AssertionError(f"replication did not catch up: {len(want)} rows on the publisher")


def _disable(subscriber: str, subscription: str) -> None:
    """Disable `subscription` and wait until its apply worker has exited (bounded)."""
    with psycopg.connect(subscriber, autocommit=True) as conn:
        conn.execute(f"ALTER SUBSCRIPTION {subscription} DISABLE")
        for _ in range(600):
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_subscription WHERE subname = %s AND pid IS NOT NULL",
                (subscription,),
            ).fetchone()
            if row == (0,):
                return
            time.sleep(0.05)
    raise AssertionError(f"the apply worker of {subscription} did not stop")


def test_rows_applied_by_logical_replication_are_projected_however_late_they_commit(
    logical_cluster: str,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    name, agg = f"r{suffix}", f"ra{suffix}"
    table = f"depeche_msgs_{name}"
    with (
        private_database(logical_cluster, f"pub_{suffix}") as publisher,
        private_database(logical_cluster, f"sub_{suffix}") as subscriber,
        engine_for(publisher) as pub_engine,
        engine_for(subscriber) as sub_engine,
    ):
        pub_store, _ = _open(pub_engine, name, agg)
        sub_store, sub_stream = _open(sub_engine, name, agg)
        # History before the subscription: brought by the initial table copy.
        write(pub_store, "acc-1", "acc-2", "other-1", "acc-1")
        with psycopg.connect(publisher, autocommit=True) as conn:
            conn.execute(f"CREATE PUBLICATION pub_{suffix} FOR TABLE {table}")
            conn.execute(f"SELECT pg_create_logical_replication_slot('s_{suffix}', 'pgoutput')")
        with psycopg.connect(subscriber, autocommit=True) as conn:
            conn.execute(
                f"CREATE SUBSCRIPTION sub_{suffix} CONNECTION '{publisher}' "
                f"PUBLICATION pub_{suffix} "
                f"WITH (create_slot = false, slot_name = 's_{suffix}')"
            )
        try:
            _wait_until_replicated(publisher, subscriber, table)
            assert sub_stream.projector.update_full() == (3, False)

            # A publisher transaction takes its global position first and commits only
            # after later ones were replicated and projected on the subscriber; its rows
            # are applied after a subscriber batch whose snapshot already saw the
            # publisher's transaction as committed. With the publisher's id in `tx`, the
            # late-commit probe would take them for rows that batch had seen.
            with pub_engine.connect() as late:
                write(pub_store, "acc-3", conn=late)
                write(pub_store, "acc-1", "acc-4", "other-2")
                _wait_until_replicated(publisher, subscriber, table)
                assert sub_stream.projector.update_full() == (2, False)
                _disable(subscriber, f"sub_{suffix}")
                late.commit()
            burn_xids_until(subscriber, current_xid(subscriber) + 1_000)
            assert sub_stream.projector.update_full() == (0, False)
            with psycopg.connect(subscriber, autocommit=True) as conn:
                conn.execute(f"ALTER SUBSCRIPTION sub_{suffix} ENABLE")
            write(pub_store, "acc-2")
            _wait_until_replicated(publisher, subscriber, table)
            assert sub_stream.projector.update_full() == (2, False)
            assert_projection(sub_engine, name, agg, WILDCARDS)

            # Every applied row carries the subscriber's own transaction id, never the
            # publisher's.
            published, applied = _tx_of(publisher, table), _tx_of(subscriber, table)
            with psycopg.connect(subscriber) as conn:
                row = conn.execute("SELECT pg_current_xact_id()::text::int8").fetchone()
            assert row is not None
            assert all(applied[m] < row[0] for m in applied)
            assert all(applied[m] != published[m] for m in applied)
        finally:
            with psycopg.connect(subscriber, autocommit=True) as conn:
                conn.execute(f"ALTER SUBSCRIPTION sub_{suffix} DISABLE")
                conn.execute(f"ALTER SUBSCRIPTION sub_{suffix} SET (slot_name = NONE)")
                conn.execute(f"DROP SUBSCRIPTION sub_{suffix}")
            with psycopg.connect(publisher, autocommit=True) as conn:
                conn.execute(f"SELECT pg_drop_replication_slot('s_{suffix}')")
            sub_store.engine.dispose()
