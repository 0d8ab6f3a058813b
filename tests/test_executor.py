"""The notification listener and the Executor: LISTEN/NOTIFY wake-ups, recovery after
the listener's connection is killed, errors, signals."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from depeche_rs import (
    AggregatedStream,
    DatabaseConnectionError,
    Executor,
    MessageHandlerRegister,
    MessageStore,
    SubscriptionMessage,
)
from depeche_rs.tools import (
    PgNotification,
    PgNotificationListener,
    PydanticMessageSerializer,
    StreamHashPartitioner,
)

from ._models import AnyEvent, Deposited

Store = MessageStore[AnyEvent]
SPAWN = multiprocessing.get_context("spawn")


def _until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait for `condition`; fail the test if it does not hold within `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _terminate(dsn: str, pid: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
    assert row == (True,)


@pytest.fixture()
def listener(dsn: str, suffix: str) -> Iterator[tuple[PgNotificationListener, list[int]]]:
    reconnects: list[int] = []
    subject = PgNotificationListener(
        dsn, [f"chan_{suffix}"], on_reconnect=lambda: reconnects.append(1)
    )
    subject.start()
    yield subject, reconnects
    subject.stop()


def _notify(dsn: str, channel: str, payload: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


def test_listener_decodes_payloads(
    dsn: str, suffix: str, listener: tuple[PgNotificationListener, list[int]]
) -> None:
    subject, _ = listener
    channel = f"chan_{suffix}"
    _notify(dsn, channel, '{"partition": 3, "position": 9}')
    _notify(dsn, channel, "not json")
    received = []
    for notification in subject.messages(timeout=5):
        received.append(notification)
        if len(received) == 2:
            break
    assert received == [
        PgNotification(channel, {"partition": 3, "position": 9}),
        PgNotification(channel, {}),
    ]


def test_listener_hears_a_channel_with_capitals(dsn: str, suffix: str) -> None:
    """Store and stream names may have capitals; their triggers notify the exact name."""
    channel = f"depeche_Orders_{suffix}_messages"
    subject = PgNotificationListener(dsn, [channel])
    subject.start()
    try:
        _notify(dsn, channel, '{"position": 1}')
        got = next(iter(subject.messages(timeout=5)), None)
    finally:
        subject.stop()
    assert got == PgNotification(channel, {"position": 1})


def test_listener_recovers_from_pg_terminate_backend(
    dsn: str, suffix: str, listener: tuple[PgNotificationListener, list[int]]
) -> None:
    subject, reconnects = listener
    channel = f"chan_{suffix}"
    first = subject.backend_pid
    assert first is not None
    _terminate(dsn, first)
    _until(lambda: subject.backend_pid not in (None, first))
    assert reconnects == [1]
    assert subject.reconnections == 1
    _notify(dsn, channel, '{"after": "reconnect"}')
    got = next(iter(subject.messages(timeout=5)))
    assert got == PgNotification(channel, {"after": "reconnect"})


def test_listener_start_with_bad_dsn_is_a_clear_error() -> None:
    subject = PgNotificationListener("postgresql://nobody@127.0.0.1:1/none", ["chan"])
    with pytest.raises(DatabaseConnectionError, match="to LISTEN"):
        subject.start()


class _Seen:
    def __init__(self) -> None:
        self.amounts: list[int] = []
        self.lock = threading.Lock()
        self.register: MessageHandlerRegister[AnyEvent] = MessageHandlerRegister()
        self.register.register(self.handle)

    def handle(self, message: SubscriptionMessage[Deposited]) -> None:
        with self.lock:
            self.amounts.append(message.stored_message.message.amount)

    def count(self) -> int:
        with self.lock:
            return len(self.amounts)


def _stream(store: Store, stream_name: str) -> AggregatedStream[AnyEvent]:
    return store.aggregated_stream(stream_name, StreamHashPartitioner(4), ["acc-%"])


def _write(store: Store, amounts: range) -> None:
    for amount in amounts:
        store.write(f"acc-{amount % 7}", Deposited(account=amount % 7, amount=amount))


def test_executor_is_woken_by_notifications_and_survives_a_killed_listener(
    dsn: str, store: Store, stream_name: str, suffix: str
) -> None:
    stream = _stream(store, stream_name)
    seen = _Seen()
    subscription = stream.subscription(f"sub_{suffix}", handlers=seen.register)
    # No stimulation: only notifications (and the catch-up after reconnecting) wake it,
    # so the writes start once it listens.
    executor = Executor(
        db_dsn=dsn.replace("postgresql://", "postgresql+psycopg://"),
        stimulation_interval=0,
        disable_signals=True,
    )
    executor.register(stream.projector)
    executor.register(subscription.runner)
    thread = threading.Thread(target=executor.run)
    thread.start()
    try:
        _until(lambda: executor.listener is not None and executor.listener.backend_pid is not None)
        _write(store, range(10))
        _until(lambda: seen.count() == 10)
        _write(store, range(10, 25))
        _until(lambda: seen.count() == 25)

        listener = executor.listener
        assert listener is not None
        first = listener.backend_pid
        assert first is not None
        _terminate(dsn, first)
        # Written while the listener may be down: the reconnection catch-up finds them.
        _write(store, range(25, 30))
        _until(lambda: listener.backend_pid not in (None, first))
        _until(lambda: seen.count() == 30)
        _write(store, range(30, 40))
        _until(lambda: seen.count() == 40)
    finally:
        executor.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert sorted(seen.amounts) == list(range(40))
    subscription.close()


def test_executor_stimulation_runs_handlers_without_notifications(
    dsn: str, store: Store, stream_name: str, suffix: str
) -> None:
    stream = _stream(store, stream_name)
    seen = _Seen()
    subscription = stream.subscription(f"sub_{suffix}", handlers=seen.register)
    executor = Executor(dsn, stimulation_interval=0.05, disable_signals=True)
    # The projector is not registered: its notifications do not exist for this executor,
    # only the periodic stimulation picks up what we project by hand.
    executor.register(subscription.runner)
    thread = threading.Thread(target=executor.run)
    thread.start()
    try:
        _write(store, range(6))
        # Projecting inside one transaction per batch notifies the stream's channel, so
        # this also wakes the subscription; silence the notifications to test stimulation.
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE depeche_stream_{stream_name} DISABLE TRIGGER USER")
        stream.projector.update_full()
        _until(lambda: seen.count() == 6)
    finally:
        executor.stop()
        thread.join(10)
    assert sorted(seen.amounts) == list(range(6))
    subscription.close()


def test_executor_reraises_a_handler_error(
    dsn: str, store: Store, stream_name: str, suffix: str
) -> None:
    stream = _stream(store, stream_name)
    register: MessageHandlerRegister[AnyEvent] = MessageHandlerRegister()

    @register.register
    def fails(message: Deposited) -> None:
        raise LookupError(f"cannot handle {message.amount}")

    subscription = stream.subscription(f"sub_{suffix}", handlers=register)
    _write(store, range(1))
    stream.projector.update_full()
    executor = Executor(dsn, disable_signals=True)
    executor.register(subscription.runner)
    with pytest.raises(LookupError, match="cannot handle 0"):
        executor.run()
    assert executor.keep_running is False
    subscription.close()


def test_executor_with_unreachable_database_is_a_clear_error(
    store: Store, stream_name: str, suffix: str
) -> None:
    subscription = _stream(store, stream_name).subscription(f"sub_{suffix}")
    executor = Executor("postgresql://nobody@127.0.0.1:1/none", disable_signals=True)
    executor.register(subscription.runner)
    with pytest.raises(DatabaseConnectionError):
        executor.run()
    subscription.close()


def _serve(dsn: str, store_name: str, stream_name: str, name: str, ready: Any) -> None:
    store: Store = MessageStore(store_name, dsn, PydanticMessageSerializer(AnyEvent))
    stream = _stream(store, stream_name)
    subscription = stream.subscription(name)
    executor = Executor(dsn)
    executor.register(stream.projector)
    executor.register(subscription.runner)
    threading.Timer(0.2, ready.set).start()
    executor.run()
    subscription.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_executor_stops_cleanly_on_signals(
    dsn: str, store: Store, stream_name: str, suffix: str, signum: int
) -> None:
    _stream(store, stream_name)
    ready = SPAWN.Event()
    child = SPAWN.Process(
        target=_serve, args=(dsn, store.name, stream_name, f"sub_{suffix}", ready)
    )
    child.start()
    assert ready.wait(30)
    assert child.pid is not None
    os.kill(child.pid, signum)
    child.join(15)
    assert child.exitcode == 0
