"""Message times: recorded at write time when the message gives one, never required
there (depeche-db asks for them only while projecting)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa

import depeche_rs
from depeche_rs import MessageStore
from depeche_rs.tools import PydanticMessageSerializer, StreamHashPartitioner

from ._models import AccountCreated, Deposited


class Timeless(AccountCreated):
    def get_message_time(self) -> dt.datetime:
        raise RuntimeError("no time here")


class Stringly(Deposited):
    def get_message_time(self) -> Any:
        return "yesterday"


class Naive(Deposited):
    def get_message_time(self) -> dt.datetime:
        return dt.datetime(2024, 5, 6, 7, 8, 9)


Event = Timeless | Stringly | Naive | AccountCreated


@pytest.fixture()
def timed_store(store_name: str, engine: sa.Engine) -> MessageStore[Event]:
    return MessageStore(store_name, engine, PydanticMessageSerializer(Event))


def _occurred_at(engine: sa.Engine, store: str) -> list[tuple[str, int, Any]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            f"SELECT stream, version, occurred_at FROM depeche_msgs_{store} "
            "ORDER BY global_position"
        ).all()
    return [tuple(row) for row in rows]  # type: ignore[misc]


def test_get_message_time_raising_or_unusable_does_not_fail_the_write(
    timed_store: MessageStore[Event], engine: sa.Engine
) -> None:
    created = AccountCreated(account=1)
    timed_store.write("acc-1", Timeless(account=1))
    timed_store.write_many("acc-1", [Stringly(account=1, amount=2), created])
    with engine.connect() as conn:
        timed_store.write("acc-1", Timeless(account=2), conn=conn)
        conn.commit()
    assert [m.version for m in timed_store.read("acc-1")] == [1, 2, 3, 4]
    assert _occurred_at(engine, timed_store.name) == [
        ("acc-1", 1, None),
        ("acc-1", 2, None),
        ("acc-1", 3, created.happened_at),
        ("acc-1", 4, None),
    ]


def test_naive_message_time_is_recorded_as_utc(
    timed_store: MessageStore[Event], engine: sa.Engine
) -> None:
    timed_store.write("acc-1", Naive(account=1, amount=1))
    assert _occurred_at(engine, timed_store.name) == [
        ("acc-1", 1, dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc))
    ]


def test_projection_asks_again_and_stops_at_a_message_without_time(
    timed_store: MessageStore[Event], stream_name: str
) -> None:
    # depeche-db's projector fails on such a message too; it must not be projected with a
    # made-up time, and what comes before it is projected.
    timed_store.write("acc-1", AccountCreated(account=1))
    timed_store.write("acc-2", Timeless(account=2))
    agg = timed_store.aggregated_stream(stream_name, StreamHashPartitioner(1), ["acc-%"])
    with pytest.raises(depeche_rs.PoisonMessageError) as info:
        for _ in range(3):
            agg.projector.update_full()
    assert "get_message_time" in str(info.value)
    projected = [(m.stream, m.version) for m in agg.read(0)]
    assert ("acc-2", 1) not in projected
