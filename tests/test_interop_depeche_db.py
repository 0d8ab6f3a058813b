"""Both libraries on one database: depeche-db 0.13.1 (installed with the `test` extra) and
depeche-rs write, project and read each other's tables; older layouts migrate."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

import depeche_rs
from depeche_rs import AggregatedStream
from depeche_rs.tools import PydanticMessageSerializer, StreamNamePartitioner

from ._helpers import check_invariants, projected_rows
from ._models import AccountCreated, AnyEvent, Deposited

depeche_db = pytest.importorskip("depeche_db", reason="install the test extra: depeche-db==0.13.1")
db_tools = pytest.importorskip("depeche_db.tools")


def _db_store(store_name: str, engine: sa.Engine) -> Any:
    return depeche_db.MessageStore(store_name, engine, db_tools.PydanticMessageSerializer(AnyEvent))


def _rs_store(store_name: str, engine: sa.Engine) -> depeche_rs.MessageStore[AnyEvent]:
    return depeche_rs.MessageStore(store_name, engine, PydanticMessageSerializer(AnyEvent))


def test_depeche_db_store_opens_and_both_writers_interleave(
    store_name: str, engine: sa.Engine
) -> None:
    db = _db_store(store_name, engine)
    first = AccountCreated(account=1)
    db.write("acc-1", first)
    rs = _rs_store(store_name, engine)
    assert [m.message for m in rs.read("acc-1")] == [first]
    rs.write("acc-1", Deposited(account=1, amount=5), expected_version=1)
    db.write("acc-1", Deposited(account=1, amount=6), expected_version=2)
    with pytest.raises(depeche_db.OptimisticConcurrencyError):
        db.write("acc-1", Deposited(account=1, amount=7), expected_version=2)
    with pytest.raises(depeche_rs.OptimisticConcurrencyError):
        rs.write("acc-1", Deposited(account=1, amount=7), expected_version=2)
    both = [(m.version, m.message) for m in rs.read("acc-1")]
    assert [v for v, _ in both] == [1, 2, 3]
    assert [(m.version, m.message) for m in db.read("acc-1")] == both
    # A fresh depeche-db process on tables depeche-rs upgraded still works.
    again = _db_store(store_name, engine)
    again.write("acc-2", AccountCreated(account=2))
    assert [m.version for m in rs.read("acc-2")] == [1]


def test_depeche_db_writes_depeche_rs_projects_depeche_db_subscribes(
    store_name: str, stream_name: str, engine: sa.Engine
) -> None:
    db = _db_store(store_name, engine)
    for i in range(20):
        db.write(f"acc-{i % 4}", Deposited(account=i % 4, amount=i))
    rs = _rs_store(store_name, engine)
    agg = rs.aggregated_stream(stream_name, StreamNamePartitioner(), ["acc-%"])
    assert agg.projector.update_full() == (20, False)
    check_invariants(engine, store_name, stream_name)

    db_agg = db.aggregated_stream(
        name=stream_name, partitioner=db_tools.StreamNamePartitioner(), stream_wildcards=["acc-%"]
    )
    seen: list[tuple[int, int, int]] = []
    handlers = depeche_db.MessageHandlerRegister()

    def handle(message: Any) -> None:
        seen.append((message.partition, message.position, message.stored_message.message.amount))

    # depeche-db reads the annotation as an object, not a (postponed) string.
    handle.__annotations__ = {"message": depeche_db.SubscriptionMessage[Deposited], "return": None}
    handlers.register(handle)

    subscription = db_agg.subscription(name="sub_" + stream_name, handlers=handlers)
    subscription.runner.run_once()
    assert sorted(a for _, _, a in seen) == list(range(20))
    for partition in {p for p, _, _ in seen}:
        assert [pos for p, pos, _ in seen if p == partition] == sorted(
            pos for p, pos, _ in seen if p == partition
        )


def test_depeche_rs_writes_depeche_db_projects_and_reads(
    store_name: str, stream_name: str, engine: sa.Engine
) -> None:
    rs = _rs_store(store_name, engine)
    rs.aggregated_stream(stream_name, StreamNamePartitioner(), ["acc-%"])  # our tables
    for i in range(12):
        rs.write(f"acc-{i % 3}", Deposited(account=i % 3, amount=i))
    db = _db_store(store_name, engine)
    db_agg = db.aggregated_stream(
        name=stream_name, partitioner=db_tools.StreamNamePartitioner(), stream_wildcards=["acc-%"]
    )
    assert db_agg.projector.update_full().n_updated_messages == 12
    check_invariants(engine, store_name, stream_name)
    with db.reader() as reader:
        assert sorted(m.message.amount for m in reader.read_wildcard("acc-%")) == list(range(12))


def test_half_projected_by_depeche_db_is_continued_by_depeche_rs_and_back(
    store_name: str, stream_name: str, engine: sa.Engine
) -> None:
    db = _db_store(store_name, engine)
    db_agg = db.aggregated_stream(
        name=stream_name, partitioner=db_tools.StreamNamePartitioner(), stream_wildcards=["acc-%"]
    )
    for i in range(10):
        db.write(f"acc-{i % 3}", Deposited(account=i % 3, amount=i))
    db_agg.projector.update_full()
    rs = _rs_store(store_name, engine)
    for i in range(10, 20):
        rs.write(f"acc-{i % 3}", Deposited(account=i % 3, amount=i))
    agg = rs.aggregated_stream(stream_name, StreamNamePartitioner(), ["acc-%"])
    assert agg.projector.update_full() == (10, False)
    check_invariants(engine, store_name, stream_name)
    # ... and depeche-db continues after depeche-rs.
    for i in range(20, 26):
        db.write(f"acc-{i % 3}", Deposited(account=i % 3, amount=i))
    db_agg.projector.update_full()
    rows = check_invariants(engine, store_name, stream_name)
    assert len(rows) == 26


def _make_depeche_db_layout(store_name: str, stream_name: str, engine: sa.Engine) -> None:
    db = _db_store(store_name, engine)
    db_agg = db.aggregated_stream(
        name=stream_name, partitioner=db_tools.StreamNamePartitioner(), stream_wildcards=["acc-%"]
    )
    for i in range(9):
        db.write(f"acc-{i % 3}", Deposited(account=i % 3, amount=i))
    db_agg.projector.update_full()


@pytest.mark.parametrize("layout", ["0.13", "0.11-0.12.2", "0.8-0.10", "before-0.8"])
def test_migrating_older_layouts_twice_then_projecting(
    store_name: str, stream_name: str, engine: sa.Engine, layout: str
) -> None:
    _make_depeche_db_layout(store_name, stream_name, engine)
    t = f"depeche_stream_{stream_name}"
    with engine.begin() as conn:
        if layout == "0.11-0.12.2":
            conn.exec_driver_sql(f"DROP TABLE {t}_maxpos")
        if layout == "0.8-0.10":
            conn.exec_driver_sql(f"DROP TABLE {t}_maxpos")
            conn.exec_driver_sql(
                f"ALTER TABLE {t} DROP COLUMN origin_stream_global_position, "
                "DROP COLUMN origin_stream_added_at"
            )
        if layout == "before-0.8":
            conn.exec_driver_sql(f"DROP TABLE {t}_maxpos")
            conn.exec_driver_sql(
                f"ALTER TABLE {t} DROP COLUMN origin_stream_global_position, "
                "DROP COLUMN origin_stream_added_at"
            )
            conn.exec_driver_sql(f'ALTER TABLE {t} RENAME TO "{stream_name}_projected_stream"')
    ddl = AggregatedStream.get_migration_ddl(stream_name, store_name)
    assert f"depeche_stream_{stream_name}" in ddl
    for _ in range(2):
        with engine.begin() as conn:
            AggregatedStream.migrate_db_objects(stream_name, conn, store_name)
    rows = projected_rows(engine, stream_name)
    assert len(rows) == 9
    assert all(r[6] is not None and r[7] is not None for r in rows)
    rs = _rs_store(store_name, engine)
    for i in range(9, 15):
        rs.write(f"acc-{i % 3}", Deposited(account=i % 3, amount=i))
    agg = rs.aggregated_stream(stream_name, StreamNamePartitioner(), ["acc-%"])
    assert agg.projector.update_full() == (6, False)
    assert len(check_invariants(engine, store_name, stream_name)) == 15


def test_migration_of_the_0_8_layout_needs_the_store_name(
    store_name: str, stream_name: str, engine: sa.Engine
) -> None:
    _make_depeche_db_layout(store_name, stream_name, engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"ALTER TABLE depeche_stream_{stream_name} DROP COLUMN origin_stream_global_position, "
            "DROP COLUMN origin_stream_added_at"
        )
    with pytest.raises(ValueError) as info, engine.begin() as conn:
        AggregatedStream.migrate_db_objects(stream_name, conn)
    assert "message_store_name" in str(info.value)


def test_store_layout_before_0_8_migrates_twice(store_name: str, engine: sa.Engine) -> None:
    db = _db_store(store_name, engine)
    first = AccountCreated(account=1)
    db.write("acc-1", first)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f'ALTER TABLE depeche_msgs_{store_name} RENAME TO "{store_name}_messages"'
        )
    for _ in range(2):
        with engine.begin() as conn:
            depeche_rs.Storage.migrate_db_objects(store_name, conn)
    rs = _rs_store(store_name, engine)
    assert [m.message for m in rs.read("acc-1")] == [first]
    assert rs.write("acc-1", AccountCreated(account=1)).version == 2
    assert depeche_rs.Storage.message_table_name(store_name) == f"depeche_msgs_{store_name}"
