"""StreamProjector and AggregatedStream: positions, ordering, partitioners, API, bad input."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import depeche_rs
from depeche_rs import AggregatedStream, MessageStore, StoredMessage
from depeche_rs.tools import StreamHashPartitioner, StreamNamePartitioner

from ._helpers import check_invariants, projected_rows, sha_partition
from ._models import AccountCreated, AnyEvent, Deposited

Store = MessageStore[AnyEvent]


class AccountPartitioner:
    def __init__(self) -> None:
        self.seen: list[StoredMessage[Any]] = []

    def get_partition(self, message: StoredMessage[Any]) -> int:
        self.seen.append(message)
        return int(message.message.account) % 4


def test_projects_with_gapless_positions_and_depeche_db_partitions(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    times = [
        dt.datetime(2024, 1, 1, 12, i, tzinfo=dt.timezone(dt.timedelta(hours=2))) for i in range(6)
    ]
    for i in range(6):
        store.write(f"acc-{i % 3}", Deposited(account=i % 3, amount=i, happened_at=times[i]))
    store.write("other-1", AccountCreated(account=9))
    agg = store.aggregated_stream(stream_name, StreamNamePartitioner(), ["acc-%"])
    assert agg.projector.update_full() == (6, False)
    assert agg.projector.update_full() == (0, False)
    rows = check_invariants(engine, store.name, stream_name, "acc-%")
    assert len(rows) == 6
    for r in rows:
        assert r[3] == sha_partition(r[1])
    by_gp = sorted(rows, key=lambda r: r[6])
    assert [r[5] for r in by_gp] == [
        t.astimezone(dt.timezone.utc).replace(tzinfo=None) for t in times
    ]
    assert [r[1] for r in by_gp] == [f"acc-{i % 3}" for i in range(6)]
    with engine.connect() as conn:
        added = dict(
            conn.exec_driver_sql(
                f"SELECT message_id, added_at FROM depeche_msgs_{store.name}"
            ).all()
        )
    assert all(r[7] == added[r[0]] for r in rows)


@pytest.mark.parametrize("batch_size", [1, 3, 1000])
def test_partition_order_is_global_order_whatever_the_batch_size(
    store: Store, stream_name: str, engine: sa.Engine, batch_size: int
) -> None:
    # More pending streams than the batch size: depeche-db reorders here, we must not.
    for i in range(40):
        store.write(f"acc-{(i * 7) % 13}", Deposited(account=(i * 7) % 13, amount=i))
    agg = store.aggregated_stream(
        stream_name, StreamHashPartitioner(2), ["acc-%"], update_batch_size=batch_size
    )
    assert agg.projector.update_full() == (40, False)
    rows = check_invariants(engine, store.name, stream_name)
    for partition in (0, 1):
        gps = [r[6] for r in rows if r[3] == partition]
        assert gps == sorted(gps)
    assert sum(1 for _ in rows) == 40


def test_python_partitioner_gets_stored_messages(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    events = [Deposited(account=i, amount=i * 10) for i in range(9)]
    for e in events:
        store.write(f"acc-{e.account}", e)
    partitioner = AccountPartitioner()
    agg = store.aggregated_stream(stream_name, partitioner, ["acc-%"], update_batch_size=4)
    assert agg.projector.update_full() == (9, False)
    assert [m.message for m in partitioner.seen] == events
    first = partitioner.seen[0]
    assert isinstance(first, StoredMessage)
    assert (first.stream, first.version, first.global_position) == ("acc-0", 1, 1)
    assert first.added_at.tzinfo is None
    rows = check_invariants(engine, store.name, stream_name)
    assert {(r[1], r[3]) for r in rows} == {(f"acc-{i}", i % 4) for i in range(9)}
    assert agg.get_max_aggregated_stream_positions() == {0: 2, 1: 1, 2: 1, 3: 1}


def test_incremental_projection_continues_positions(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    agg = store.aggregated_stream(stream_name, StreamHashPartitioner(1), ["acc-%"])
    for round_ in range(5):
        for i in range(round_ + 1):
            store.write(f"acc-{i}", AccountCreated(account=i))
        assert agg.projector.update_full().n_updated_messages == round_ + 1
    rows = check_invariants(engine, store.name, stream_name)
    assert [r[4] for r in rows] == list(range(15))


@pytest.mark.parametrize(
    ("wildcards", "expected"),
    [
        (["acc-%"], {"acc-1", "acc-22", "acc-"}),
        (["acc-_"], {"acc-1"}),
        (["acc-1", "b\\_x"], {"acc-1", "b_x"}),
        (["%\\%%"], {"50%off"}),
        (["ü%"], {"über"}),
        (["%"], {"acc-1", "acc-22", "acc-", "b_x", "bax", "50%off", "über", "x\\y"}),
        (["x\\\\y"], {"x\\y"}),
    ],
)
def test_wildcards_follow_like_semantics(
    store: Store, stream_name: str, engine: sa.Engine, wildcards: list[str], expected: set[str]
) -> None:
    for s in ["acc-1", "acc-22", "acc-", "b_x", "bax", "50%off", "über", "x\\y"]:
        store.write(s, AccountCreated(account=1))
    agg = store.aggregated_stream(stream_name, StreamHashPartitioner(3), wildcards)
    agg.projector.update_full()
    assert {r[1] for r in projected_rows(engine, stream_name)} == expected
    for s in ["acc-1", "acc-22", "acc-", "b_x", "bax", "50%off", "über", "x\\y"]:
        assert agg.projector.interested_in_notification({"stream": s}) == (s in expected)


def test_notifications_one_per_partition_with_partition_and_position(
    store: Store, stream_name: str, dsn: str, engine: sa.Engine
) -> None:
    agg = store.aggregated_stream(stream_name, StreamHashPartitioner(3), ["acc-%"])
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {agg.notification_channel}")
        for i in range(30):
            store.write(f"acc-{i}", AccountCreated(account=i))
        agg.projector.update_full()
        texts = [n.payload for n in listener.notifies(timeout=1.0)]
    payloads = [json.loads(t) for t in texts]
    maxpos = agg.get_max_aggregated_stream_positions()
    assert sorted((p["partition"], p["position"]) for p in payloads) == sorted(maxpos.items())
    # Byte for byte what depeche-db's trigger (json_build_object) sends, naming the
    # message at the partition's highest position.
    with engine.connect() as conn:
        at = dict(
            conn.execute(
                sa.text(
                    f"SELECT partition, message_id FROM depeche_stream_{stream_name} AS a "
                    "WHERE position = (SELECT max(position) FROM "
                    f"depeche_stream_{stream_name} AS b WHERE b.partition = a.partition)"
                )
            ).all()
        )
    assert sorted(texts) == sorted(
        f'{{"message_id" : "{at[p]}", "partition" : {p}, "position" : {q}}}'
        for p, q in maxpos.items()
    )
    assert agg.notification_channel == f"depeche_{stream_name}_messages"
    assert agg.projector.notification_channel == f"depeche_{store.name}_messages"


def test_store_notifications_one_per_message_in_global_order(
    store: Store, dsn: str, engine: sa.Engine
) -> None:
    # depeche-db notifies once per message; a listener acting on each payload must see all.
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN depeche_{store.name}_messages")
        p = store.write("acc-1", AccountCreated(account=1))
        store.write_many("acc-2", [AccountCreated(account=2), AccountCreated(account=3)])
        with engine.begin() as conn:  # one statement over two streams, in reverse order
            conn.exec_driver_sql(
                f"INSERT INTO depeche_msgs_{store.name} (message_id, stream, version, message) "
                "SELECT gen_random_uuid(), s, 1, '{}' FROM unnest(ARRAY['acc-4', 'acc-3']) AS s"
            )
        payloads = [json.loads(n.payload) for n in listener.notifies(timeout=1.0)]
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            f"SELECT message_id::text, stream, version, global_position "
            f"FROM depeche_msgs_{store.name} ORDER BY global_position"
        ).all()
    assert [list(p) for p in payloads] == [
        ["message_id", "stream", "version", "global_position"]
    ] * 5
    assert [tuple(p.values()) for p in payloads] == [tuple(r) for r in rows]
    assert [(x["stream"], x["version"]) for x in payloads] == [
        ("acc-1", 1),
        ("acc-2", 1),
        ("acc-2", 2),
        ("acc-4", 1),
        ("acc-3", 1),
    ]
    assert payloads[0]["global_position"] == p.global_position


def test_read_read_slice_and_statistics(store: Store, stream_name: str) -> None:
    for i in range(10):
        store.write(
            f"acc-{i % 2}",
            AccountCreated(
                account=i % 2, happened_at=dt.datetime(2024, 1, 1, i, tzinfo=dt.timezone.utc)
            ),
        )
    agg = store.aggregated_stream(stream_name, AccountPartitioner(), ["acc-%"])
    agg.projector.update_full()
    part0 = list(agg.read(0))
    assert [m.position for m in part0] == [0, 1, 2, 3, 4]
    assert [m.partition for m in part0] == [0] * 5
    assert [m.position for m in agg.read_slice(0, 2, 2)] == [2, 3]
    assert [m.message_id for m in agg.read_slice(0, 2, 2)] == [m.message_id for m in part0[2:4]]
    assert list(agg.read_slice(0, 5, 10)) == []
    assert list(agg.read(3)) == []

    stats = list(agg.get_partition_statistics())
    assert [(s.partition_number, s.next_message_position, s.max_position) for s in stats] == [
        (0, 0, 4),
        (1, 0, 4),
    ]
    assert stats[0].next_message_id == part0[0].message_id
    assert stats[1].next_message_occurred_at == dt.datetime(2024, 1, 1, 1)
    limited = list(agg.get_partition_statistics(position_limits={0: 3, 1: 4}))
    assert [(s.partition_number, s.next_message_position) for s in limited] == [(0, 4)]
    assert [s.partition_number for s in agg.get_partition_statistics(result_limit=1)] == [0]
    assert [s.partition_number for s in agg.get_partition_statistics(1)] == [0]

    assert agg.time_to_positions(dt.datetime(2024, 1, 1, 4, tzinfo=dt.timezone.utc)) == {0: 2, 1: 2}
    assert agg.time_to_positions(
        dt.datetime(2024, 1, 1, 6, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    ) == {0: 3, 1: 2}
    assert agg.time_to_positions(dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)) == {0: 5, 1: 5}
    with pytest.raises(depeche_rs.NaiveDatetimeError) as info:
        agg.time_to_positions(dt.datetime(2024, 1, 1))
    assert isinstance(info.value, ValueError)
    assert agg.global_position_to_positions(0) == {0: -1, 1: -1}
    assert agg.global_position_to_positions(3) == {0: 1, 1: 0}
    assert agg.global_position_to_positions(100) == {0: 4, 1: 4}


def test_truncate_resets_and_reprojects(store: Store, stream_name: str, engine: sa.Engine) -> None:
    for i in range(5):
        store.write(f"acc-{i}", AccountCreated(account=i))
    agg = store.aggregated_stream(stream_name, StreamHashPartitioner(2), ["acc-%"])
    agg.projector.update_full()
    with engine.connect() as conn:
        agg.truncate(conn)
        conn.commit()
    assert projected_rows(engine, stream_name) == []
    assert agg.get_max_aggregated_stream_positions() == {}
    assert agg.projector.update_full() == (5, False)
    check_invariants(engine, store.name, stream_name)


def test_messages_written_without_time_get_it_from_the_message(
    store: Store, stream_name: str, engine: sa.Engine, serializer: Any
) -> None:
    # depeche-db's own write function does not record the message time.
    event = Deposited(
        account=1, amount=2, happened_at=dt.datetime(2023, 5, 6, 7, 8, tzinfo=dt.timezone.utc)
    )
    with engine.connect() as conn:
        conn.exec_driver_sql(
            f"SELECT * FROM depeche_write_message_{store.name}(%s, %s, %s::json, NULL)",
            (event.event_id, "acc-1", json.dumps(serializer.serialize(event))),
        )
        conn.commit()
    store.write("acc-1", Deposited(account=1, amount=3))
    agg = store.aggregated_stream(stream_name, StreamNamePartitioner(), ["acc-%"])
    assert agg.projector.update_full() == (2, False)
    rows = check_invariants(engine, store.name, stream_name)
    assert rows[0][5] == dt.datetime(2023, 5, 6, 7, 8)
    assert [m.version for m in store.read("acc-1")] == [1, 2]


def test_run_returns_run_on_notification_results(store: Store, stream_name: str) -> None:
    for i in range(30):
        store.write(f"acc-{i}", AccountCreated(account=i))
    agg = store.aggregated_stream(
        stream_name, StreamHashPartitioner(2), ["acc-%"], update_batch_size=5
    )

    class Spent:
        def over_budget(self) -> bool:
            return True

    assert agg.projector.run(Spent()) == depeche_rs.RunOnNotificationResult.WORK_REMAINING
    assert len(projected := list(agg.read(0)) + list(agg.read(1))) == 5, projected
    assert agg.projector.run() == depeche_rs.RunOnNotificationResult.DONE_FOR_NOW
    assert sum(1 for _ in agg.read(0)) + sum(1 for _ in agg.read(1)) == 30
    agg.projector.stop()
    assert agg.projector.update_batch() == (0, False)


class BadPartitioner:
    def __init__(self, result: Any) -> None:
        self.result = result

    def get_partition(self, message: StoredMessage[Any]) -> Any:
        if message.version == 2:
            if isinstance(self.result, Exception):
                raise self.result
            return self.result
        return 0


@pytest.mark.parametrize("result", [-1, "1", 1.0, None, True, 2**31, ValueError("nope")])
def test_bad_partitions_write_nothing_and_name_the_message(
    store: Store, stream_name: str, engine: sa.Engine, result: Any
) -> None:
    store.write("acc-1", AccountCreated(account=1))
    second = store.write("acc-1", AccountCreated(account=1))
    agg = store.aggregated_stream(stream_name, BadPartitioner(result), ["acc-%"])
    with pytest.raises(depeche_rs.PartitionerError) as info:
        agg.projector.update_full()
    assert isinstance(info.value, ValueError)
    assert info.value.stream == "acc-1"
    assert "acc-1" in str(info.value)
    message_id = next(m.message_id for m in store.read("acc-1", min_version=2))
    assert info.value.message_id == message_id and str(message_id) in str(info.value)
    assert projected_rows(engine, stream_name) == []
    assert second.version == 2
    # Fix the partitioner: everything is projected, nothing was half-written.
    agg.projector.partitioner = BadPartitioner(0)
    assert agg.projector.update_full() == (2, False)
    check_invariants(engine, store.name, stream_name)


def test_undeserializable_message_is_a_clear_error(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    with engine.connect() as conn:
        conn.exec_driver_sql(
            f"SELECT * FROM depeche_write_message_{store.name}(%s, 'acc-1', %s::json, NULL)",
            (uuid.uuid4(), '{"__typename__": "Nope"}'),
        )
        conn.commit()
    agg = store.aggregated_stream(stream_name, AccountPartitioner(), ["acc-%"])
    with pytest.raises(depeche_rs.SerializationError) as info:
        agg.projector.update_full()
    assert "acc-1" in str(info.value)
    assert projected_rows(engine, stream_name) == []


@pytest.mark.parametrize("wildcards", [[], "acc-%", [""], [1], ["ok", None], ["trailing\\"], None])
def test_bad_wildcards(store: Store, stream_name: str, wildcards: Any) -> None:
    with pytest.raises(depeche_rs.InvalidWildcardError) as info:
        store.aggregated_stream(stream_name, StreamNamePartitioner(), wildcards)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["", "1x", "a-b", "x;drop table y", "x" * 42])
def test_bad_stream_names(store: Store, name: str) -> None:
    with pytest.raises(depeche_rs.InvalidNameError):
        store.aggregated_stream(name, StreamNamePartitioner(), ["%"])


def test_longest_names_depeche_db_accepts_project_and_read(
    engine: sa.Engine, serializer: Any, suffix: str, dsn: str
) -> None:
    # depeche-db accepts 39 characters for a store and 41 for an aggregated stream; its
    # test suite uses names like id_<uuid4> (39). The reader derives "<stream>_reader".
    store_name = (suffix + "_s").ljust(39, "x")
    agg_name = (suffix + "_a").ljust(41, "x")
    store: Store = MessageStore(store_name, engine, serializer)
    store.write("acc-1", AccountCreated(account=1))
    agg = store.aggregated_stream(agg_name, StreamHashPartitioner(2), ["acc-%"])
    assert agg.projector.update_full() == (1, False)
    reader = agg.reader()
    reader.start()
    try:
        assert [m.stream for m in reader.get_messages(timeout=1)] == ["acc-1"]
    finally:
        reader.stop()
    with engine.connect() as conn:
        triggers = conn.exec_driver_sql(
            "SELECT tgrelid::regclass::text, tgname, tgfoid::regproc::text FROM pg_trigger "
            "WHERE tgrelid IN (%s::regclass, %s::regclass) AND NOT tgisinternal ORDER BY 1, 2",
            (f"depeche_msgs_{store_name}", f"depeche_stream_{agg_name}"),
        ).all()
    assert [(t, n, f) for t, n, f in triggers if "notify" in n] == [
        (f"depeche_msgs_{store_name}", "depeche_rs_notify_messages", "depeche_rs_notify_messages"),
        (
            f"depeche_stream_{agg_name}",
            "depeche_rs_notify_partitions",
            "depeche_rs_notify_partitions",
        ),
    ]


def test_names_longer_than_depeche_db_accepts_create_nothing(
    engine: sa.Engine, serializer: Any, store: Store, suffix: str
) -> None:
    with pytest.raises(depeche_rs.InvalidNameError, match="at most 39"):
        MessageStore((suffix + "_s").ljust(40, "x"), engine, serializer)
    with pytest.raises(depeche_rs.InvalidNameError, match="at most 41"):
        store.aggregated_stream((suffix + "_a").ljust(42, "x"), StreamNamePartitioner(), ["%"])
    with engine.connect() as conn:
        created = conn.exec_driver_sql(
            "SELECT relname FROM pg_class WHERE relname LIKE %s AND relname NOT LIKE %s",
            (f"%{suffix}%", f"%s_{suffix}%"),
        ).all()
    assert created == []


def test_bad_partitioner_and_batch_size(store: Store, stream_name: str) -> None:
    with pytest.raises(TypeError):
        store.aggregated_stream(stream_name, object(), ["%"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.aggregated_stream(stream_name, StreamNamePartitioner(), ["%"], update_batch_size=0)
    with pytest.raises(ValueError):
        StreamHashPartitioner(0)


def test_aggregated_stream_class_constructor_and_names(store: Store, stream_name: str) -> None:
    agg = AggregatedStream(stream_name, store, StreamNamePartitioner(), ["acc-%"])
    assert agg.name == stream_name
    assert AggregatedStream.stream_table_name("x") == "depeche_stream_x"
    assert AggregatedStream.notification_channel_name("x") == "depeche_x_messages"
    assert isinstance(agg.projector, depeche_rs.StreamProjector)


def test_builtin_partitioners_match_python_implementations() -> None:
    class M:
        def __init__(self, stream: str) -> None:
            self.stream = stream

    for s in ["", "a", "account-1", "ü" * 100]:
        assert StreamNamePartitioner().get_partition(M(s)) == sha_partition(s)  # type: ignore[arg-type]
        assert 0 <= StreamHashPartitioner(5).get_partition(M(s)) < 5  # type: ignore[arg-type]
