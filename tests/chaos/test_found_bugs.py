"""Library bugs the chaos and property tests ran into, one test each, named after what
broke. A bug still open is a strict xfail (it fails with XPASS once fixed, and the marker
goes with the fix); the others are regression tests of fixed bugs."""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import depeche_rs
from depeche_rs import (
    AckRolledback,
    AggregatedStream,
    MessageHandlerRegister,
    MessageStore,
    SubscriptionMessage,
)
from depeche_rs.tools import PydanticMessageSerializer, StreamHashPartitioner

from .._models import AnyEvent, Deposited
from ._harness import private_database

pytestmark = pytest.mark.chaos


def test_dsn_options_with_spaces_reach_the_projector(dsn: str, store_name: str) -> None:
    with_options = f"{dsn}?options=-c%20statement_timeout%3D5000"
    store: MessageStore[AnyEvent] = MessageStore(
        store_name, with_options, PydanticMessageSerializer(AnyEvent)
    )
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "5s"
        store.write("acc-1", Deposited(account=1, amount=1))
        stream = store.aggregated_stream("a_" + store_name, StreamHashPartitioner(2), ["acc-%"])
        assert stream.projector.update_full() == (1, False)
    finally:
        store.engine.dispose()


def test_wildcard_ending_in_an_odd_run_of_backslashes_is_refused(
    store: MessageStore[AnyEvent], stream_name: str
) -> None:
    store.write("acc-1", Deposited(account=1, amount=1))
    store.write("a\\\\", Deposited(account=2, amount=1))
    try:
        stream = store.aggregated_stream(
            stream_name, StreamHashPartitioner(2), ["acc-%", "a\\\\\\"]
        )
    except depeche_rs.InvalidWildcardError:
        return
    stream.projector.update_full()  # raises DatabaseError (22025), acc-1 never projected


class _Raw:
    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.message_id = uuid.uuid4()

    def get_message_id(self) -> uuid.UUID:
        return self.message_id

    def get_message_time(self) -> dt.datetime:
        return dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


class _RawSerializer:
    def serialize(self, message: _Raw) -> dict[str, Any]:
        return message.body

    def deserialize(self, message: dict[str, Any]) -> _Raw:
        return _Raw(message)


def test_lone_surrogate_in_a_payload_is_a_serialization_error(
    engine: sa.Engine, store_name: str
) -> None:
    store: MessageStore[_Raw] = MessageStore(store_name, engine, _RawSerializer())
    with engine.connect() as conn:
        with pytest.raises(depeche_rs.SerializationError):
            store.write("s-1", _Raw({"text": "\ud800"}), conn=conn)
        # Nothing was sent: the caller's transaction goes on.
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1


def test_text_with_a_backslash_before_u0000_is_storable(engine: sa.Engine, store_name: str) -> None:
    store: MessageStore[_Raw] = MessageStore(store_name, engine, _RawSerializer())
    store.write("s-1", _Raw({"path": "C:\\u0000dir"}))
    assert [m.message.body for m in store.read("s-1")] == [{"path": "C:\\u0000dir"}]


def test_long_aggregated_stream_names_keep_their_own_notification_channel(
    store: MessageStore[AnyEvent], suffix: str, dsn: str
) -> None:
    first = suffix + "x" * (37 - len(suffix)) + "1"
    second = first[:-1] + "2"
    assert len(first) == len(second) == 38  # the longest names allowed
    one = store.aggregated_stream(first, StreamHashPartitioner(2), ["x-%"])
    store.aggregated_stream(second, StreamHashPartitioner(2), ["y-%"])
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {one.notification_channel}")
        store.write("x-1", Deposited(account=1, amount=1))
        assert one.projector.update_full() == (1, False)
        one.projector.close()
        channels = [n.channel for n in listener.notifies(timeout=2, stop_after=1)]
    assert channels == [one.notification_channel]


@pytest.fixture()
def timed_stream(
    store: MessageStore[AnyEvent], stream_name: str, dsn: str
) -> Iterator[AggregatedStream[AnyEvent]]:
    """The aggregated stream seen through a projector with a 50 ms statement timeout,
    its statements already prepared."""
    timed = MessageStore(store.name, f"{dsn}?options=--statement_timeout%3D50", store._serializer)
    stream = timed.aggregated_stream(stream_name, StreamHashPartitioner(2), ["acc-%"])
    assert stream.projector.update_full() == (0, False)
    yield stream
    stream.projector.close()
    timed.engine.dispose()


def _stalled_update(
    store: MessageStore[AnyEvent], dsn: str, stream: AggregatedStream[AnyEvent]
) -> depeche_rs.DatabaseError:
    """The error of an update_full whose statement timeout runs out on its write to the
    max positions table, which another session holds locked (mid-batch: the rows are
    inserted already)."""
    for i in range(3):
        store.write(f"acc-{i}", Deposited(account=i, amount=1))
    with psycopg.connect(dsn) as holder:
        holder.execute(f"LOCK TABLE depeche_stream_{stream.name}_maxpos IN EXCLUSIVE MODE")
        try:
            with pytest.raises(depeche_rs.DatabaseError) as caught:
                stream.projector.update_full()
        finally:
            holder.rollback()
    return caught.value


def test_statement_timeout_mid_batch_is_reported_as_a_statement_timeout(
    store: MessageStore[AnyEvent], dsn: str, timed_stream: AggregatedStream[AnyEvent]
) -> None:
    sqlstates = {_stalled_update(store, dsn, timed_stream).sqlstate for _ in range(20)}
    assert sqlstates == {"57014"}


def test_database_errors_carry_the_server_message(
    store: MessageStore[AnyEvent], dsn: str, timed_stream: AggregatedStream[AnyEvent]
) -> None:
    error = _stalled_update(store, dsn, timed_stream)
    assert "statement timeout" in str(error)


def test_in_transaction_ack_stays_exactly_once_when_the_partition_lock_is_lost(
    dsn: str,
) -> None:
    with private_database(dsn, f"chaos_{uuid.uuid4().hex[:12]}") as url:
        store: MessageStore[AnyEvent] = MessageStore("s", url, PydanticMessageSerializer(AnyEvent))
        engine = store.engine
        try:
            stream = store.aggregated_stream("a", StreamHashPartitioner(1), ["acc-%"])
            store.write("acc-1", Deposited(account=1, amount=1))
            assert stream.projector.update_full() == (1, False)
            stream.projector.close()
            with engine.begin() as conn:
                conn.exec_driver_sql("CREATE TABLE effects (consumer text, position int)")
            b_handling = threading.Event()
            b_outcome: list[object] = []

            def handlers(consumer: str, hook: Any) -> MessageHandlerRegister[AnyEvent]:
                register: MessageHandlerRegister[AnyEvent] = MessageHandlerRegister()

                @register.register
                def handle(message: SubscriptionMessage[Deposited]) -> None:
                    with engine.connect() as conn:
                        conn.exec_driver_sql(
                            "INSERT INTO effects VALUES (%s, %s)", (consumer, message.position)
                        )
                        hook()
                        message.ack.execute(conn=conn)
                        conn.commit()

                return register

            def run_b() -> None:
                try:
                    consumer_b.runner.run_once()
                    b_outcome.append("done")
                except Exception as exc:
                    b_outcome.append(exc)

            thread_b = threading.Thread(target=run_b)

            def lose_the_lock_then_let_b_in() -> None:
                # A's partition lock goes with its connection (a network cut, an idle
                # timeout, an operator); A's handler transaction is still open.
                with psycopg.connect(url, autocommit=True) as admin:
                    admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() "
                        "AND application_name = 'depeche-rs subscription'"
                    )
                thread_b.start()
                assert b_handling.wait(10), "consumer B never got the message"

            consumer_a = stream.subscription(
                "sub", handlers=handlers("a", lose_the_lock_then_let_b_in)
            )
            consumer_b = stream.subscription("sub", handlers=handlers("b", b_handling.set))
            try:
                # The consumer that loses the race learns it from its acknowledgement.
                with contextlib.suppress(depeche_rs.DatabaseConnectionError, AckRolledback):
                    consumer_a.runner.run_once()
                thread_b.join(10)
            finally:
                consumer_a.close()
                consumer_b.close()
            with engine.connect() as conn:
                effects = conn.exec_driver_sql("SELECT consumer, position FROM effects").all()
            assert len(effects) == 1, f"the message took effect {len(effects)} times: {effects}"
        finally:
            engine.dispose()
