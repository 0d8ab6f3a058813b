"""Storage: depeche-db's row layer (`MessageStore._storage`) on our tables: writes through
the store's write function in the caller's transaction, optimistic concurrency, reads,
and rows that the store and the projector treat exactly as `MessageStore.write`'s."""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import depeche_rs
from depeche_rs import MessagePosition, MessageStore, OptimisticConcurrencyError, Storage
from depeche_rs.tools import PydanticMessageSerializer, StreamNamePartitioner

from ._helpers import check_invariants, wait_until_blocked_on_advisory_lock
from ._models import AccountCreated, AnyEvent, Deposited

Store = MessageStore[AnyEvent]


def _rows(conn: sa.Connection, storage: Storage) -> list[Any]:
    t = storage.message_table
    return list(conn.execute(t.select().order_by(t.c.global_position)))


def test_message_store_keeps_a_storage_on_its_own_tables(store: Store, engine: sa.Engine) -> None:
    storage = store._storage
    assert isinstance(storage, Storage)
    assert storage.name == store.name
    assert storage.engine is store.engine
    assert storage.notification_channel == f"depeche_{store.name}_messages"
    assert storage.notification_channel == store.notification_channel
    assert storage.message_table.name == f"depeche_msgs_{store.name}"
    assert [c.name for c in storage.message_table.primary_key] == ["message_id"]
    # The Table has the columns the database has, in its order, with matching types.
    with engine.connect() as conn:
        types = (
            conn.exec_driver_sql(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                (storage.message_table.name,),
            )
            .tuples()
            .all()
        )
    assert [c.name for c in storage.message_table.columns] == [name for name, _ in types]
    assert dict(types) == {
        "message_id": "uuid",
        "global_position": "bigint",
        "added_at": "timestamp without time zone",
        "stream": "character varying(255)",
        "version": "integer",
        "message": "jsonb",
        "tx": "xid8",
        "occurred_at": "timestamp with time zone",
    }
    dialect = engine.dialect
    assert {c.name: c.type.compile(dialect=dialect) for c in storage.message_table.columns} == {
        "message_id": "UUID",
        "global_position": "BIGINT",
        "added_at": "TIMESTAMP WITHOUT TIME ZONE",
        "stream": "VARCHAR(255)",
        "version": "INTEGER",
        "message": "JSONB",
        "tx": "xid8",
        "occurred_at": "TIMESTAMP WITH TIME ZONE",
    }


def test_add_and_add_all_write_in_the_callers_transaction(store: Store, engine: sa.Engine) -> None:
    storage = store._storage
    ids = [uuid.uuid4() for _ in range(4)]
    with engine.connect() as conn:
        assert storage.add(conn, "s1", 0, ids[0], {"n": 1}) == MessagePosition("s1", 1, 1)
        assert storage.add(conn, "s2", None, ids[1], {"n": 2}) == MessagePosition("s2", 1, 2)
        position = storage.add_all(conn, "s1", 1, [(ids[2], {"n": 3}), (ids[3], {"n": 4})])
        assert position == MessagePosition("s1", 3, 4)
        txid = int(conn.exec_driver_sql("SELECT pg_current_xact_id()::text").scalar_one())
        with engine.connect() as other:
            assert _rows(other, storage) == []  # the caller has not committed
        conn.commit()
    with engine.connect() as conn:
        rows = _rows(conn, storage)
    assert [
        (r.message_id, r.stream, r.version, r.message, r.global_position, r.tx, r.occurred_at)
        for r in rows
    ] == [
        (ids[0], "s1", 1, {"n": 1}, 1, txid, None),
        (ids[1], "s2", 1, {"n": 2}, 2, txid, None),
        (ids[2], "s1", 2, {"n": 3}, 3, txid, None),
        (ids[3], "s1", 3, {"n": 4}, 4, txid, None),
    ]
    assert all(isinstance(r.added_at, dt.datetime) and r.added_at.tzinfo is None for r in rows)

    with engine.connect() as conn:
        storage.add(conn, "s3", 0, uuid.uuid4(), {"n": 5})
        conn.rollback()
    with engine.connect() as conn:
        assert storage.get_max_version(conn, "s3") == MessagePosition("s3", 0, None)
        # The rolled-back write used global position 5: the next one is 6.
        assert storage.add(conn, "s3", 0, uuid.uuid4(), {"n": 6}) == MessagePosition("s3", 1, 6)
        conn.commit()


def test_add_all_records_given_message_times(store: Store, engine: sa.Engine) -> None:
    storage = store._storage
    when = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    a, b = uuid.uuid4(), uuid.uuid4()
    with engine.begin() as conn:
        storage.add_all(conn, "t", None, [(a, {}), (b, {})], message_times=[when, None])
    with engine.connect() as conn:
        assert [(r.message_id, r.occurred_at) for r in _rows(conn, storage)] == [
            (a, when),
            (b, None),
        ]


def test_optimistic_concurrency_error_as_the_store_raises_it(
    store: Store, engine: sa.Engine
) -> None:
    storage = store._storage
    with engine.connect() as conn:
        storage.add_all(conn, "s", 0, [(uuid.uuid4(), {"n": i}) for i in range(2)])
        conn.commit()
        with pytest.raises(OptimisticConcurrencyError) as first:
            storage.add(conn, "s", 1, uuid.uuid4(), {"n": 9})
        assert (first.value.stream, first.value.expected_version, first.value.actual_version) == (
            "s",
            1,
            2,
        )
        assert isinstance(first.value.__cause__, sa.exc.DBAPIError)
        conn.rollback()
        # expected_version applies before the first message of add_all.
        with pytest.raises(OptimisticConcurrencyError) as info:
            storage.add_all(conn, "s", 3, [(uuid.uuid4(), {}), (uuid.uuid4(), {})])
        assert info.value.actual_version == 2
        conn.rollback()
        with pytest.raises(OptimisticConcurrencyError):
            storage.add(conn, "new", 1, uuid.uuid4(), {})
        conn.rollback()
        assert [r.version for r in _rows(conn, storage)] == [1, 2]
    # The store's own write reports a conflict with the same error and attributes.
    with pytest.raises(OptimisticConcurrencyError) as from_store:
        store.write("s", AccountCreated(account=1), expected_version=1)
    assert str(from_store.value) == str(first.value)
    assert (
        from_store.value.stream,
        from_store.value.expected_version,
        from_store.value.actual_version,
    ) == ("s", 1, 2)


@pytest.mark.parametrize("first_commits", [True, False])
def test_two_connections_racing_add_on_one_stream(
    store: Store, engine: sa.Engine, first_commits: bool
) -> None:
    """The second writer waits on the stream's lock until the first ends; it then loses
    (the first committed) or wins (the first rolled back)."""
    storage = store._storage
    first_id, second_id = uuid.uuid4(), uuid.uuid4()
    outcome: list[Any] = []
    with engine.connect() as first, engine.connect() as second:
        second_pid = second.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        second.rollback()
        assert storage.add(first, "race", 0, first_id, {"who": 1}).version == 1

        def second_writer() -> None:
            try:
                outcome.append(storage.add(second, "race", 0, second_id, {"who": 2}))
                second.commit()
            except OptimisticConcurrencyError as exc:
                second.rollback()
                outcome.append(exc)

        thread = threading.Thread(target=second_writer)
        thread.start()
        wait_until_blocked_on_advisory_lock(engine, second_pid, "the second writer", 10)
        assert outcome == []
        if first_commits:
            first.commit()
        else:
            first.rollback()
        thread.join(10)
        assert not thread.is_alive()
    with engine.connect() as conn:
        rows = [(r.message_id, r.version, r.message) for r in _rows(conn, storage)]
    if first_commits:
        [error] = outcome
        assert isinstance(error, OptimisticConcurrencyError)
        assert (error.stream, error.expected_version, error.actual_version) == ("race", 0, 1)
        assert rows == [(first_id, 1, {"who": 1})]
    else:
        assert [(p.stream, p.version) for p in outcome] == [("race", 1)]
        assert rows == [(second_id, 1, {"who": 2})]


def test_concurrent_adds_exactly_one_wins_each_version(store: Store, engine: sa.Engine) -> None:
    storage = store._storage
    n_threads, rounds = 6, 10
    barrier = threading.Barrier(n_threads)
    wins: list[tuple[int, uuid.UUID]] = []
    losses: list[int] = []
    lock = threading.Lock()

    def writer() -> None:
        for version in range(rounds):
            barrier.wait()
            message_id = uuid.uuid4()
            with engine.connect() as conn:
                try:
                    storage.add(conn, "hot", version, message_id, {"v": version})
                    conn.commit()
                    with lock:
                        wins.append((version, message_id))
                except OptimisticConcurrencyError:
                    with lock:
                        losses.append(version)

    threads = [threading.Thread(target=writer) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(v for v, _ in wins) == list(range(rounds))
    assert sorted(losses) == sorted(v for v in range(rounds) for _ in range(n_threads - 1))
    with engine.connect() as conn:
        assert list(storage.get_message_ids(conn, "hot")) == [m for _, m in sorted(wins)]


def test_reads_return_depeche_db_rows(store: Store, engine: sa.Engine) -> None:
    storage = store._storage
    ids = [uuid.uuid4() for _ in range(4)]
    with engine.begin() as conn:
        storage.add(conn, "acc-1", 0, ids[0], {"n": 0})
        storage.add(conn, "acc-2", 0, ids[1], {"n": 1})
        storage.add(conn, "other", 0, ids[2], {"n": 2})
        storage.add(conn, "acc-1", 1, ids[3], {"n": 3})
    with engine.connect() as conn:
        added: dict[uuid.UUID, dt.datetime] = dict(
            conn.exec_driver_sql(f"SELECT message_id, added_at FROM depeche_msgs_{store.name}")
            .tuples()
            .all()
        )
        full = {
            ids[0]: (ids[0], "acc-1", 1, {"n": 0}, 1, added[ids[0]]),
            ids[1]: (ids[1], "acc-2", 1, {"n": 1}, 2, added[ids[1]]),
            ids[2]: (ids[2], "other", 1, {"n": 2}, 3, added[ids[2]]),
            ids[3]: (ids[3], "acc-1", 2, {"n": 3}, 4, added[ids[3]]),
        }
        assert [tuple(r) for r in storage.read(conn, "acc-1")] == [
            (ids[0], 1, {"n": 0}, 1, added[ids[0]]),
            (ids[3], 2, {"n": 3}, 4, added[ids[3]]),
        ]
        assert [tuple(r) for r in storage.read(conn, "acc-1", 2)] == [
            (ids[3], 2, {"n": 3}, 4, added[ids[3]])
        ]
        assert list(storage.read(conn, "nope")) == []
        assert [tuple(r) for r in storage.read_multiple(conn, ["other", "acc-1"])] == [
            full[ids[0]],
            full[ids[2]],
            full[ids[3]],
        ]
        assert list(storage.read_multiple(conn, [])) == []
        assert [tuple(r) for r in storage.read_wildcard(conn, "acc-%")] == [
            full[ids[0]],
            full[ids[1]],
            full[ids[3]],
        ]
        assert [tuple(r) for r in storage.read_wildcard(conn, "%")] == [full[i] for i in ids]
        row = storage.get_message_by_id(conn, ids[2])
        assert row is not None and tuple(row) == full[ids[2]]
        assert storage.get_message_by_id(conn, uuid.uuid4()) is None
        by_ids = storage.get_messages_by_ids(conn, [ids[3], uuid.uuid4(), str(ids[1])])  # type: ignore[list-item]
        assert [tuple(r) for r in by_ids] == [full[ids[1]], full[ids[3]]]
        assert list(storage.get_messages_by_ids(conn, [])) == []
        assert list(storage.get_message_ids(conn, "acc-1")) == [ids[0], ids[3]]
        assert list(storage.get_message_ids(conn, "nope")) == []
        assert storage.get_global_position(conn) == 4
        assert storage.get_max_version(conn, "acc-1") == MessagePosition("acc-1", 2, 4)
        assert storage.get_max_version(conn, "nope") == MessagePosition("nope", 0, None)
        # Rows compare as depeche-db's tuples and have its column names.
        assert row.stream == "other" and row.global_position == 3  # type: ignore[attr-defined]


def test_truncate_in_the_callers_transaction(store: Store, engine: sa.Engine) -> None:
    storage = store._storage
    store.write("a", AccountCreated(account=1))
    with engine.connect() as conn:
        storage.truncate(conn)
        assert storage.get_global_position(conn) == 0
        conn.rollback()
        assert storage.get_global_position(conn) == 1
        storage.truncate(conn)
        conn.commit()
    assert list(store.read("a")) == []
    with engine.connect() as conn:
        assert storage.get_global_position(conn) == 0


def test_rows_from_storage_are_read_and_projected_as_the_stores_own(
    store: Store, stream_name: str, engine: sa.Engine, serializer: PydanticMessageSerializer[Any]
) -> None:
    when = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    by_store = [Deposited(account=1, amount=i, happened_at=when) for i in range(3)]
    by_storage = [Deposited(account=2, amount=i, happened_at=when) for i in range(3)]
    store.write_many("acc-1", by_store, expected_version=0)
    with engine.begin() as conn:
        for version, event in enumerate(by_storage):
            store._storage.add(
                conn, "acc-2", version, event.get_message_id(), serializer.serialize(event)
            )
    assert [m.message for m in store.read("acc-1")] == by_store
    assert [m.message for m in store.read("acc-2")] == by_storage
    with store.reader() as reader:
        assert [m.message for m in reader.read_wildcard("acc-%")] == by_store + by_storage
        got = reader.get_message_by_id(by_storage[1].event_id)
        assert (got.message, got.stream, got.version, got.global_position) == (
            by_storage[1],
            "acc-2",
            2,
            5,
        )
    # The store appends to a stream the row layer wrote, and the other way round.
    created = AccountCreated(account=2, happened_at=when)
    assert store.write("acc-2", created, expected_version=3) == MessagePosition("acc-2", 4, 7)
    assert store.synchronize("acc-2", 4, [*by_storage, created]) == MessagePosition("acc-2", 4, 7)
    with engine.begin() as conn:
        assert store._storage.add(conn, "raw-1", 0, uuid.uuid4(), {}) == MessagePosition(
            "raw-1", 1, 8
        )

    agg = store.aggregated_stream(stream_name, StreamNamePartitioner(), ["acc-%"])
    assert agg.projector.update_full() == (7, False)
    rows = check_invariants(engine, store.name, stream_name, "acc-%")
    # The same message time whoever wrote: recorded by the store's write, asked from
    # the message by the projector for the row layer's.
    naive_when = when.replace(tzinfo=None)
    assert sorted((r[1], r[2], r[0], r[5]) for r in rows) == sorted(
        [("acc-1", i + 1, e.event_id, naive_when) for i, e in enumerate(by_store)]
        + [("acc-2", i + 1, e.event_id, naive_when) for i, e in enumerate(by_storage)]
        + [("acc-2", 4, created.event_id, naive_when)]
    )
    with engine.connect() as conn:
        occurred: dict[str, int] = dict(
            conn.exec_driver_sql(
                f"SELECT stream, count(occurred_at) FROM depeche_msgs_{store.name} GROUP BY stream"
            )
            .tuples()
            .all()
        )
    assert occurred == {"acc-1": 3, "acc-2": 1, "raw-1": 0}


def test_storage_writes_notify_once_per_message(store: Store, dsn: str, engine: sa.Engine) -> None:
    storage = store._storage
    a, b = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {storage.notification_channel}")
        with engine.begin() as conn:
            storage.add_all(conn, "n", 0, [(a, {}), (b, {})])
        payloads = [json.loads(n.payload) for n in listener.notifies(timeout=1.0)]
    assert payloads == [
        {"message_id": str(a), "stream": "n", "version": 1, "global_position": 1},
        {"message_id": str(b), "stream": "n", "version": 2, "global_position": 2},
    ]


def test_bad_input_raises_typed_errors_and_writes_nothing(store: Store, engine: sa.Engine) -> None:
    storage = store._storage
    bad: Any = storage  # called with what its annotations forbid
    good = uuid.uuid4()
    naive = dt.datetime(2024, 1, 1)
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda c: bad.add(c, "", 0, good, {}), depeche_rs.InvalidNameError, "stream"),
        (lambda c: bad.add(c, "x" * 256, 0, good, {}), depeche_rs.InvalidNameError, "255"),
        (lambda c: bad.add(c, "s", True, good, {}), TypeError, "expected_version"),
        (lambda c: bad.add(c, "s", "1", good, {}), TypeError, "expected_version"),
        (lambda c: bad.add(c, "s", 0, 42, {}), depeche_rs.InvalidMessageError, "42"),
        (lambda c: bad.add(c, "s", 0, good, [1]), depeche_rs.SerializationError, "dict"),
        (
            lambda c: bad.add(c, "s", 0, good, {"x": float("nan")}),
            depeche_rs.SerializationError,
            "not JSON",
        ),
        (
            lambda c: bad.add(c, "s", 0, good, {"x": "a\x00b"}),
            depeche_rs.SerializationError,
            "NUL",
        ),
        (
            lambda c: bad.add(c, "s", 0, good, {"x": object()}),
            depeche_rs.SerializationError,
            "not JSON",
        ),
        (lambda c: bad.add_all(c, "s", 0, []), ValueError, "at least one"),
        (lambda c: bad.add_all(c, "s", 0, [good]), depeche_rs.InvalidMessageError, "pair"),
        (lambda c: bad.add_all(c, "s", 0, "ab"), TypeError, "sequence"),
        (
            lambda c: bad.add_all(c, "s", 0, [(good, {})], message_times=[naive]),
            depeche_rs.NaiveDatetimeError,
            "timezone",
        ),
        (
            lambda c: bad.add_all(c, "s", 0, [(good, {})], message_times=[]),
            ValueError,
            "message_times",
        ),
        (lambda c: bad.get_message_by_id(c, "nope"), TypeError, "UUID"),
    ]
    with engine.connect() as conn:
        for call, error, text in cases:
            with pytest.raises(error, match=text):
                call(conn)
        # Nothing reached the database: the transaction is still usable and empty.
        assert storage.get_global_position(conn) == 0
        storage.add(conn, "s", 0, good, {"ok": True})
        conn.rollback()
    with engine.connect() as conn:
        assert _rows(conn, storage) == []
    with engine.connect() as conn:
        storage.add(conn, "s", 0, good, {})
        with pytest.raises(sa.exc.IntegrityError):
            storage.add(conn, "t", 0, good, {})  # a message id is unique in the store


def test_standalone_storage_creates_the_store_objects(
    store_name: str, engine: sa.Engine, dsn: str
) -> None:
    storage = Storage(store_name, dsn)
    with storage.engine.begin() as conn:
        assert storage.add(conn, "s", 0, uuid.uuid4(), {"a": 1}) == MessagePosition("s", 1, 1)
    storage.engine.dispose()
    with pytest.raises(depeche_rs.InvalidNameError):
        Storage("bad name", engine)
