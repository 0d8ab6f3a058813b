"""The projector under maintenance: the aggregated table truncated by either library, by
SQL, or dropped, with writers and projectors running; an unsafe sequence setting; a message
that cannot be decoded. Every test checks the whole outcome with `assert_projection`."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import depeche_rs
from depeche_rs import AggregatedStream, MessageStore, _schema
from depeche_rs.tools import StreamHashPartitioner, StreamNamePartitioner

from ._helpers import projected_rows, wait_until_blocked_on_advisory_lock
from ._models import AnyEvent
from ._operations import (
    Store,
    assert_projection,
    depeche_db_stream,
    projected_streams,
    run_concurrently,
    write,
    write_mixed,
)

BOTH = ["acc-%", "loan-%"]


def _aggregate(
    store: Store, name: str, wildcards: list[str], batch_size: int = 7
) -> AggregatedStream[AnyEvent]:
    return store.aggregated_stream(
        name, StreamHashPartitioner(3), wildcards, update_batch_size=batch_size
    )


# -- truncation -----------------------------------------------------------------------------


def _next_positions(conn: sa.Connection, name: str) -> dict[int, int]:
    """Where each partition goes on: after the maximum `_maxpos` still holds."""
    return dict(
        conn.exec_driver_sql(
            f"SELECT partition, max_position + 1 FROM depeche_stream_{name}_maxpos"
        ).all()
    )


# Each truncates aggregated stream `name` in the caller's transaction and returns the
# position each partition's next row must get (0 where not given).


def _truncate_with_depeche_db(store: Store, name: str, conn: sa.Connection) -> dict[int, int]:
    """depeche-db's `AggregatedStream.truncate`: a DELETE that keeps `_maxpos`, so
    positions go on after the old maximum, as depeche-db's own projector continues."""
    depeche_db_stream(store, name, BOTH).truncate(conn)
    return _next_positions(conn, name)


def _truncate_with_depeche_rs(store: Store, name: str, conn: sa.Connection) -> dict[int, int]:
    """Ours resets the positions too."""
    _aggregate(store, name, BOTH).truncate(conn)
    return {}


def _truncate_by_sql(store: Store, name: str, conn: sa.Connection) -> dict[int, int]:
    """An operator's TRUNCATE of the aggregated table alone."""
    conn.exec_driver_sql(f"TRUNCATE depeche_stream_{name}")
    return _next_positions(conn, name)


def _drop(store: Store, name: str, conn: sa.Connection) -> dict[int, int]:
    """An operator drops the aggregated tables (the next process creates them again)."""
    conn.exec_driver_sql(f"DROP TABLE depeche_stream_{name}, depeche_stream_{name}_maxpos")
    return {}


TRUNCATIONS = {
    "depeche-db-truncate": _truncate_with_depeche_db,
    "depeche-rs-truncate": _truncate_with_depeche_rs,
    "sql-truncate": _truncate_by_sql,
    "drop-tables": _drop,
}


@pytest.mark.parametrize("truncate", list(TRUNCATIONS.values()), ids=list(TRUNCATIONS))
def test_truncated_stream_is_projected_again_exactly_once(
    store: Store, stream_name: str, engine: sa.Engine, truncate: Any
) -> None:
    agg = _aggregate(store, stream_name, BOTH)
    for i in range(6):
        write(store, f"acc-{i}", f"loan-{i % 2}", "other-1", f"acc-{i % 3}")
    assert agg.projector.update_full() == (18, False)
    with engine.connect() as late:
        write(store, "acc-late", conn=late)  # open across the truncation and the re-projection
        with engine.begin() as conn:
            first = truncate(store, stream_name, conn)
        _aggregate(store, stream_name, BOTH)  # another process starts (and creates tables)
        assert projected_rows(engine, stream_name) == []
        write(store, "acc-9", "loan-9")
        assert agg.projector.update_full() == (20, False)
        late.commit()
    assert agg.projector.update_full() == (1, False)
    assert_projection(engine, store.name, stream_name, BOTH, first_positions=first)


@pytest.mark.parametrize(
    "truncate",
    [_truncate_with_depeche_db, _truncate_with_depeche_rs, _truncate_by_sql],
    ids=["depeche-db-truncate", "depeche-rs-truncate", "sql-truncate"],
)
def test_truncation_while_writers_and_projectors_run(
    store: Store, stream_name: str, engine: sa.Engine, serializer: Any, truncate: Any
) -> None:
    halfway = threading.Event()
    first: dict[int, int] = {}

    def writer() -> None:
        try:
            write_mixed(store, engine, 0, 40)
        finally:
            halfway.set()
        write_mixed(store, engine, 1, 40)

    def truncater() -> None:
        halfway.wait()
        with engine.begin() as conn:
            first.update(truncate(store, stream_name, conn))

    def projector() -> Any:
        own = MessageStore(store.name, engine, serializer)
        return _aggregate(own, stream_name, BOTH, batch_size=5).projector.update_full

    run_concurrently([writer, truncater], [projector(), projector()])
    _aggregate(store, stream_name, BOTH).projector.update_full()
    assert_projection(engine, store.name, stream_name, BOTH, first_positions=first)


# -- the global-position sequence -----------------------------------------------------------


def _sequence(store: Store) -> str:
    return f"depeche_msgs_{store.name}_global_seq"


def _fix_by_hand(store: Store, conn: sa.Connection, error: Any) -> None:
    conn.exec_driver_sql(f"ALTER SEQUENCE {_sequence(store)} CACHE 1")


def _fix_with_the_errors_sql(store: Store, conn: sa.Connection, error: Any) -> None:
    conn.exec_driver_sql(error.fix)


def _fix_with_the_store_migration(store: Store, conn: sa.Connection, error: Any) -> None:
    depeche_rs.Storage.migrate_db_objects(store.name, conn)


SEQUENCE_FIXES = {
    "alter-sequence": _fix_by_hand,
    "error-fix-sql": _fix_with_the_errors_sql,
    "store-migration": _fix_with_the_store_migration,
}


def _write_alternating(store: Store, engine: sa.Engine, stream: str, n: int) -> None:
    """Write `n` versions of `stream`, alternating between two sessions."""
    with engine.connect() as a, engine.connect() as b:
        for version in range(n):
            session = (a, b)[version % 2]
            write(store, stream, conn=session)
            session.commit()


@pytest.mark.parametrize("fix", list(SEQUENCE_FIXES.values()), ids=list(SEQUENCE_FIXES))
def test_cached_sequence_is_refused_until_fixed(
    store: Store, stream_name: str, engine: sa.Engine, fix: Any
) -> None:
    agg = _aggregate(store, stream_name, ["acc-%"])
    write(store, "acc-1", "acc-2")
    assert agg.projector.update_full() == (2, False)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER SEQUENCE {_sequence(store)} CACHE 20")
    with engine.connect() as one_session:
        write(store, "acc-1", "acc-3", conn=one_session)
        one_session.commit()
    with pytest.raises(depeche_rs.UnsafeSequenceError) as info:
        agg.projector.update_full()
    error = info.value
    assert error.sequence == _sequence(store)
    assert _sequence(store) in str(error)
    assert "alter sequence" in str(error).lower() and "cache 1" in str(error).lower()
    assert "cache 1" in error.fix.lower()
    assert projected_streams(engine, stream_name) == [("acc-1", 1), ("acc-2", 1)]
    with engine.begin() as conn:
        fix(store, conn, error)
    _write_alternating(store, engine, "acc-4", 4)
    assert agg.projector.update_full() == (6, False)
    assert_projection(engine, store.name, stream_name, ["acc-%"])


def test_versions_drawn_from_a_cached_sequence_are_projected_in_version_order(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER SEQUENCE {_sequence(store)} CACHE 20")
    _write_alternating(store, engine, "acc-1", 6)
    versions = [m.version for m in sorted(store.read("acc-1"), key=lambda m: m.global_position)]
    assert versions != sorted(versions), "the cache did not reorder global positions"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER SEQUENCE {_sequence(store)} CACHE 1")
    assert _aggregate(store, stream_name, ["acc-%"], 100).projector.update_full() == (6, False)
    assert_projection(engine, store.name, stream_name, ["acc-%"])


def test_a_huge_gap_in_global_positions_is_crossed_in_a_few_batches(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    # A `setval` far ahead (or deleted history) leaves 2**40 positions with no row; the
    # cursor jumps to below the next visible row instead of crossing the gap window by
    # window (2**16 batches of the widest window).
    agg = _aggregate(store, stream_name, ["acc-%"])
    write(store, "acc-1", "loan-1")
    assert agg.projector.update_full() == (1, False)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"SELECT setval('{_sequence(store)}', 1099511627776)")
    write(store, "loan-2", "acc-1")
    batches = [agg.projector.update_batch() for _ in range(3)]
    assert batches == [(0, True), (1, False), (0, False)]
    assert_projection(engine, store.name, stream_name, ["acc-%"])


# -- a message that cannot be decoded -------------------------------------------------------


def _write_garbage(store: Store, engine: sa.Engine, stream: str) -> tuple[uuid.UUID, int, int]:
    """Write an undecodable message without a message time, as raw SQL would."""
    message_id = uuid.uuid4()
    with engine.begin() as conn:
        version, global_position = conn.exec_driver_sql(
            f"SELECT version, global_position FROM depeche_write_message_{store.name}"
            "(%s, %s, '{\"garbage\": 1}'::json)",
            (message_id, stream),
        ).one()
    return message_id, version, global_position


def _record_time(store: Store, conn: sa.Connection, message_id: uuid.UUID) -> None:
    conn.exec_driver_sql(
        f"UPDATE depeche_msgs_{store.name} SET occurred_at = '2020-01-02T03:04:05Z' "
        "WHERE message_id = %s",
        (message_id,),
    )


def _delete(store: Store, conn: sa.Connection, message_id: uuid.UUID) -> None:
    conn.exec_driver_sql(
        f"DELETE FROM depeche_msgs_{store.name} WHERE message_id = %s", (message_id,)
    )


@pytest.mark.parametrize("remedy", [_record_time, _delete], ids=["record-time", "delete"])
@pytest.mark.parametrize("before", [10, 12], ids=["at-a-batch-start", "mid-batch"])
def test_poison_message_stops_the_projector_until_an_operator_acts(
    store: Store, stream_name: str, engine: sa.Engine, remedy: Any, before: int
) -> None:
    agg = store.aggregated_stream(
        stream_name, StreamNamePartitioner(), ["acc-%"], update_batch_size=5
    )
    earlier = write(store, *(f"acc-{i % 4}" for i in range(before)))
    message_id, version, global_position = _write_garbage(store, engine, "acc-9")
    later = write(store, *(f"acc-{i % 3}" for i in range(7)))
    # The whole batches before it are projected, nothing of its own batch.
    unprojected = {*earlier[before // 5 * 5 :], message_id, *later}
    for _ in range(2):  # every run stops at the same message
        with pytest.raises(depeche_rs.PoisonMessageError) as info:
            agg.projector.update_full()
        error = info.value
        assert isinstance(error, depeche_rs.SerializationError)
        assert (error.store, error.stream, error.version) == (store.name, "acc-9", version)
        assert (error.global_position, error.message_id) == (global_position, message_id)
        assert_projection(engine, store.name, stream_name, ["acc-%"], unprojected=unprojected)
    with engine.begin() as conn:
        remedy(store, conn, message_id)
    expected = len(unprojected) - (remedy is _delete)
    assert agg.projector.update_full() == (expected, False)
    rows = assert_projection(engine, store.name, stream_name, ["acc-%"])
    if remedy is _record_time:
        [poison] = [r for r in rows if r[0] == message_id]
        assert poison[5] == dt.datetime(2020, 1, 2, 3, 4, 5)


# -- vacuum, analyze and the projector's lock ---------------------------------------------


class _HeldPartitioner:
    """A Python partitioner that holds the first batch open until released (the engine
    calls it inside the batch's transaction, with the projector's lock held)."""

    def __init__(self) -> None:
        self.inside = threading.Event()
        self.release = threading.Event()
        self.same_as = StreamHashPartitioner(3)  # what `_aggregate` uses

    def get_partition(self, message: Any) -> int:
        self.inside.set()
        assert self.release.wait(30), "the test never released the batch"
        return self.same_as.get_partition(message)


def _mutex_key(conn: sa.Connection, name: str) -> int:
    """The projector mutex's key, as docs/projector.md gives it."""
    oid = conn.exec_driver_sql(f"SELECT 'depeche_stream_{name}'::regclass::oid::int8").scalar()
    assert isinstance(oid, int)
    return (_schema.PROJECTOR_MUTEX_CLASS << 32) | oid


def test_vacuum_and_analyze_neither_stop_nor_wait_for_projection(
    store: Store, stream_name: str, engine: sa.Engine, dsn: str
) -> None:
    write(store, "acc-1", "acc-2")
    agg = _aggregate(store, stream_name, ["acc-%"])
    agg.projector.update_full()
    write(store, "acc-3", "acc-4")
    # What VACUUM, ANALYZE and autovacuum take, held open: projection goes on.
    with engine.connect() as vacuum:
        vacuum.exec_driver_sql(
            f"LOCK TABLE depeche_stream_{stream_name} IN SHARE UPDATE EXCLUSIVE MODE"
        )
        assert agg.projector.update_full() == (2, False)
        vacuum.rollback()
    # And a batch held open does not hold up VACUUM and ANALYZE.
    held = _HeldPartitioner()
    slow = store.aggregated_stream(stream_name, held, ["acc-%"])
    write(store, "acc-5")
    worker = threading.Thread(target=slow.projector.update_full)
    worker.start()
    try:
        assert held.inside.wait(30)
        # Its own session (VACUUM runs outside a transaction), not one from the pool.
        with psycopg.connect(dsn, autocommit=True) as maintenance:
            maintenance.execute("SET lock_timeout = '20s'")
            maintenance.execute(f"VACUUM (ANALYZE) depeche_stream_{stream_name}")
    finally:
        held.release.set()
        worker.join(30)
    assert_projection(engine, store.name, stream_name, ["acc-%"])


@pytest.mark.parametrize("holder", ["projector mutex", "depeche-db projector lock"])
def test_another_projector_holding_the_stream_makes_update_return_at_once(
    store: Store, stream_name: str, engine: sa.Engine, holder: str
) -> None:
    write(store, "acc-1")
    agg = _aggregate(store, stream_name, ["acc-%"])
    with engine.connect() as other:
        if holder == "projector mutex":
            other.exec_driver_sql(
                "SELECT pg_advisory_lock(%(k)s)", {"k": _mutex_key(other, stream_name)}
            )
        else:
            other.exec_driver_sql(f"LOCK TABLE depeche_stream_{stream_name} IN EXCLUSIVE MODE")
        assert agg.projector.update_full() == (0, False)
        assert agg.projector.update_batch() == (0, False)
        other.rollback()
        other.exec_driver_sql("SELECT pg_advisory_unlock_all()")
    assert agg.projector.update_full() == (1, False)
    assert_projection(engine, store.name, stream_name, ["acc-%"])


def test_a_delete_during_a_batch_ends_as_if_it_waited_for_the_batch(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    # depeche-db's truncate (a plain DELETE) reads in a snapshot taken before a batch in
    # progress commits. Its trigger waits for the batch, then deletes what the batch
    # added too and resets the cursors: acc-1 is projected again as versions 1, 2, 3 in
    # order (had version 3 kept its place, it would come before 1 and 2).
    write(store, "acc-1", "acc-1", "loan-1")
    _aggregate(store, stream_name, BOTH).projector.update_full()
    held = _HeldPartitioner()
    slow = store.aggregated_stream(stream_name, held, BOTH)
    write(store, "acc-1")
    worker = threading.Thread(target=slow.projector.update_full)
    worker.start()
    deleted = threading.Event()
    try:
        assert held.inside.wait(30)
        with engine.begin() as deleter:
            pid = deleter.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            assert isinstance(pid, int)

            def delete() -> None:
                deleter.exec_driver_sql(f"DELETE FROM depeche_stream_{stream_name}")
                deleted.set()

            thread = threading.Thread(target=delete)
            thread.start()
            wait_until_blocked_on_advisory_lock(engine, pid, "the DELETE")
            assert not deleted.is_set()
            held.release.set()
            thread.join(30)
            assert deleted.is_set()
            first = _next_positions(deleter, stream_name)
    finally:
        held.release.set()
        worker.join(30)
    assert projected_streams(engine, stream_name) == []
    assert _aggregate(store, stream_name, BOTH).projector.update_full() == (4, False)
    assert_projection(engine, store.name, stream_name, BOTH, first_positions=first)


def test_a_partial_delete_without_a_batch_deletes_only_its_rows(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    write(store, "acc-1", "acc-2", "loan-1")
    _aggregate(store, stream_name, BOTH).projector.update_full()
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"DELETE FROM depeche_stream_{stream_name} WHERE origin_stream = 'acc-2'"
        )
        left = conn.exec_driver_sql(
            f"SELECT origin_stream FROM depeche_stream_{stream_name} ORDER BY 1"
        ).all()
    assert [r[0] for r in left] == ["acc-1", "loan-1"]
    assert _aggregate(store, stream_name, BOTH).projector.update_full() == (1, False)
    assert sorted(projected_streams(engine, stream_name)) == [
        ("acc-1", 1),
        ("acc-2", 1),
        ("loan-1", 1),
    ]
