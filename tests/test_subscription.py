"""Subscriptions against a real PostgreSQL: delivery, order, state, start points, ack
strategies, error handlers, acknowledging in the caller's transaction, bad input."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import pickle
import struct
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import depeche_rs
from depeche_rs import (
    AckStrategy,
    AggregatedStream,
    ExitSubscriptionErrorHandler,
    FixedTimeBudget,
    InvalidHandlerError,
    InvalidNameError,
    LogAndIgnoreSubscriptionErrorHandler,
    MessageHandlerRegister,
    MessageStore,
    NaiveDatetimeError,
    RunOnNotificationResult,
    SerializationError,
    StartAtNextMessage,
    StartAtPointInTime,
    StoredMessage,
    Subscription,
    SubscriptionMessage,
    SubscriptionState,
)
from depeche_rs.tools import DbLockProvider, DbSubscriptionStateProvider, StreamHashPartitioner
from depeche_rs.tools._db_lock_provider import advisory_lock_key

from ._models import AnyEvent, Deposited

Store = MessageStore[AnyEvent]
Stream = AggregatedStream[AnyEvent]
PARTITIONS = 4
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def _write(store: Store, count: int, streams: int = 12, start: int = 0) -> None:
    for i in range(start, start + count):
        store.write(
            f"acc-{i % streams}",
            Deposited(account=i % streams, amount=i, happened_at=T0 + dt.timedelta(minutes=i)),
        )


def _project(stream: Stream) -> None:
    while stream.projector.update_full()[1]:
        pass


@pytest.fixture()
def stream(store: Store, stream_name: str) -> Stream:
    agg = store.aggregated_stream(stream_name, StreamHashPartitioner(PARTITIONS), ["acc-%"])
    _write(store, 60)
    _project(agg)
    return agg


def _layout(engine: sa.Engine, stream: Stream) -> dict[int, list[int]]:
    """partition -> amounts (our message payload) in position order."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            f"SELECT a.partition, a.position, (m.message->>'amount')::int "
            f"FROM depeche_stream_{stream.name} a "
            f"JOIN depeche_msgs_{stream.store.name} m USING (message_id) "
            "ORDER BY a.partition, a.position"
        ).all()
    layout: dict[int, list[int]] = {}
    for partition, position, amount in rows:
        assert position == len(layout.setdefault(partition, []))
        layout[partition].append(amount)
    return layout


def _state(engine: sa.Engine, name: str) -> dict[int, int]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            f"SELECT partition, position FROM depeche_subscriptions_{name} "
            "WHERE subscription_name = %s",
            (name,),
        ).all()
    return {partition: position for partition, position in rows}


def _make_unreadable(engine: sa.Engine, stream: Stream, amount: int) -> None:
    """Replace the body of the message with `amount` by one no serializer can read."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"UPDATE depeche_msgs_{stream.store.name} SET message = '{{\"bogus\": 1}}' "
            "WHERE (message->>'amount')::int = %s",
            (amount,),
        )


class Recorder:
    """A handler register recording (partition, position, amount) per call."""

    def __init__(self, fail: Callable[[SubscriptionMessage[Any]], bool] | None = None) -> None:
        self.seen: list[tuple[int, int, int]] = []
        self.fail = fail
        self.register: MessageHandlerRegister[AnyEvent] = MessageHandlerRegister()
        self.register.register(self.handle)

    def handle(self, message: SubscriptionMessage[Deposited]) -> None:
        if self.fail is not None and self.fail(message):
            raise RuntimeError(f"failing at {message.partition}/{message.position}")
        self.seen.append(
            (message.partition, message.position, message.stored_message.message.amount)
        )

    def by_partition(self) -> dict[int, list[int]]:
        result: dict[int, list[int]] = {}
        for partition, _, amount in self.seen:
            result.setdefault(partition, []).append(amount)
        return result


def _run(subscription: Subscription[Any]) -> None:
    assert subscription.runner.run_once() == RunOnNotificationResult.DONE_FOR_NOW


@pytest.mark.parametrize("strategy", [AckStrategy.SINGLE, AckStrategy.BATCHED])
def test_every_message_once_in_partition_order_and_state_stored(
    stream: Stream, engine: sa.Engine, suffix: str, strategy: AckStrategy
) -> None:
    recorder = Recorder()
    name = f"sub_{suffix}"
    subscription = stream.subscription(
        name, handlers=recorder.register, batch_size=4, ack_strategy=strategy
    )
    _run(subscription)
    layout = _layout(engine, stream)
    assert recorder.by_partition() == layout
    assert sum(len(v) for v in layout.values()) == 60
    for partition, amounts in layout.items():
        positions = [pos for p, pos, _ in recorder.seen if p == partition]
        assert positions == list(range(len(amounts)))
    expected_state = {p: len(a) - 1 for p, a in layout.items()}
    assert _state(engine, name) == {-1: -1, **expected_state}
    subscription.close()

    # A new subscription object with the same name resumes: nothing to redo.
    again = Recorder()
    resumed = stream.subscription(name, handlers=again.register, ack_strategy=strategy)
    _run(resumed)
    assert again.seen == []
    _write(stream.store, 8, start=60)
    _project(stream)
    _run(resumed)
    assert sorted(a for _, _, a in again.seen) == list(range(60, 68))
    resumed.close()


def test_start_at_next_message_skips_the_backlog(
    stream: Stream, engine: sa.Engine, suffix: str
) -> None:
    recorder = Recorder()
    subscription = stream.subscription(
        f"sub_{suffix}", handlers=recorder.register, start_point=StartAtNextMessage()
    )
    _run(subscription)
    assert recorder.seen == []
    _write(stream.store, 5, start=60)
    _project(stream)
    _run(subscription)
    assert sorted(a for _, _, a in recorder.seen) == [60, 61, 62, 63, 64]
    subscription.close()


def test_start_at_point_in_time(stream: Stream, engine: sa.Engine, suffix: str) -> None:
    recorder = Recorder()
    subscription = stream.subscription(
        f"sub_{suffix}",
        handlers=recorder.register,
        # Message i happened at T0 + i minutes; an offset other than UTC on purpose.
        start_point=StartAtPointInTime(
            (T0 + dt.timedelta(minutes=42)).astimezone(dt.timezone(dt.timedelta(hours=5)))
        ),
    )
    _run(subscription)
    assert sorted(a for _, _, a in recorder.seen) == list(range(42, 60))
    subscription.close()


def test_start_point_applies_only_to_a_new_subscription(
    stream: Stream, engine: sa.Engine, suffix: str
) -> None:
    first = Recorder()
    subscription = stream.subscription(f"sub_{suffix}", handlers=first.register)
    _run(subscription)
    assert len(first.seen) == 60
    subscription.close()
    _write(stream.store, 3, start=60)
    _project(stream)
    later = Recorder()
    restarted = stream.subscription(
        f"sub_{suffix}", handlers=later.register, start_point=StartAtNextMessage()
    )
    _run(restarted)
    assert sorted(a for _, _, a in later.seen) == [60, 61, 62]
    restarted.close()


def test_naive_datetime_start_point_fails_at_construction() -> None:
    with pytest.raises(NaiveDatetimeError, match="timezone aware"):
        StartAtPointInTime(dt.datetime(2024, 1, 1))
    with pytest.raises(ValueError):
        StartAtPointInTime(dt.datetime(2024, 1, 1))
    with pytest.raises(TypeError, match="must be a datetime"):
        StartAtPointInTime("2024-01-01")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["bad-name", "1abc", "x; DROP TABLE t", "", "a" * 42, "naïve"])
def test_invalid_subscription_name_fails_at_construction(
    stream: Stream, engine: sa.Engine, name: str
) -> None:
    with pytest.raises(InvalidNameError):
        stream.subscription(name)
    with engine.connect() as conn:
        created = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_class WHERE relname = %s",
            (f"depeche_subscriptions_{name}"[:63],),
        ).scalar()
    assert created == 0


def test_other_bad_arguments_fail_at_construction(stream: Stream, suffix: str) -> None:
    register: MessageHandlerRegister[AnyEvent] = MessageHandlerRegister()

    @register.register
    def needs_more(message: Deposited, session: Any) -> None:
        pass

    with pytest.raises(InvalidHandlerError, match="call_middleware"):
        stream.subscription(f"sub_{suffix}", handlers=register)
    with pytest.raises(ValueError, match="batch_size"):
        stream.subscription(f"sub_{suffix}", batch_size=0)
    with pytest.raises(ValueError, match="ack_strategy"):
        stream.subscription(f"sub_{suffix}", ack_strategy="single")  # type: ignore[arg-type]


def test_single_exit_on_error_keeps_the_failed_message(
    stream: Stream, engine: sa.Engine, suffix: str
) -> None:
    layout = _layout(engine, stream)
    target = (1, 3)
    broken = True
    recorder = Recorder(fail=lambda m: broken and (m.partition, m.position) == target)
    name = f"sub_{suffix}"
    subscription = stream.subscription(
        name,
        handlers=recorder.register,
        batch_size=10,
        error_handler=ExitSubscriptionErrorHandler(),
    )
    with pytest.raises(RuntimeError, match="failing at 1/3"):
        subscription.runner.run_once()
    assert _state(engine, name).get(1) == 2
    assert [pos for p, pos, _ in recorder.seen if p == 1] == [0, 1, 2]

    broken = False
    _run(subscription)
    assert [pos for p, pos, _ in recorder.seen if p == 1] == list(range(len(layout[1])))
    # Nothing was delivered twice: only the failed message is retried, and it never
    # reached the recorder the first time.
    assert len(recorder.seen) == len(set(recorder.seen)) == 60
    subscription.close()


def test_single_log_and_ignore_acknowledges_the_failed_message(
    stream: Stream, engine: sa.Engine, suffix: str
) -> None:
    layout = _layout(engine, stream)
    name = f"sub_{suffix}"
    recorder = Recorder(fail=lambda m: m.position == 2)
    subscription = stream.subscription(
        name,
        handlers=recorder.register,
        error_handler=LogAndIgnoreSubscriptionErrorHandler(name),
    )
    _run(subscription)
    assert len(recorder.seen) == 60 - PARTITIONS
    assert _state(engine, name) == {-1: -1, **{p: len(a) - 1 for p, a in layout.items()}}
    subscription.close()


@pytest.mark.parametrize("fail_at", [4, 3], ids=["mid_batch", "first_of_later_batch"])
@pytest.mark.parametrize("provider", ["db", "memory"])
def test_batched_failure_redelivers_from_the_failed_message_only(
    stream: Stream, engine: sa.Engine, suffix: str, fail_at: int, provider: str
) -> None:
    layout = _layout(engine, stream)
    assert len(layout[2]) > 6
    broken = True
    recorder = Recorder(fail=lambda m: broken and (m.partition, m.position) == (2, fail_at))
    name = f"sub_{suffix}"
    memory = InMemoryState()
    subscription = stream.subscription(
        name,
        handlers=recorder.register,
        batch_size=3,
        ack_strategy=AckStrategy.BATCHED,
        state_provider=memory if provider == "memory" else None,
    )

    def state() -> dict[int, int]:
        return memory.positions[name] if provider == "memory" else _state(engine, name)

    with pytest.raises(RuntimeError, match=f"failing at 2/{fail_at}"):
        subscription.runner.run_once()
    # Batches of partition 2 are [0, 1, 2], [3, 4, 5], ...: what was handled before the
    # failure is acknowledged (depeche-db 0.13 stores -1 when position 3 fails).
    assert state()[2] == fail_at - 1

    broken = False
    _run(subscription)
    positions = [pos for p, pos, _ in recorder.seen if p == 2]
    assert positions == list(range(len(layout[2])))
    assert len(recorder.seen) == 60
    subscription.close()


def test_batched_log_and_ignore(stream: Stream, engine: sa.Engine, suffix: str) -> None:
    name = f"sub_{suffix}"
    recorder = Recorder(fail=lambda m: m.position == 0)
    subscription = stream.subscription(
        name,
        handlers=recorder.register,
        ack_strategy=AckStrategy.BATCHED,
        error_handler=LogAndIgnoreSubscriptionErrorHandler(name),
    )
    _run(subscription)
    assert len(recorder.seen) == 60 - PARTITIONS
    layout = _layout(engine, stream)
    assert _state(engine, name) == {-1: -1, **{p: len(a) - 1 for p, a in layout.items()}}
    subscription.close()


def test_ack_in_the_callers_transaction_is_exactly_once(
    stream: Stream, engine: sa.Engine, suffix: str
) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE effects_{suffix} (amount int PRIMARY KEY)")
    crash_on = {17}
    handlers: MessageHandlerRegister[AnyEvent] = MessageHandlerRegister()

    @handlers.register
    def apply(message: SubscriptionMessage[Deposited]) -> None:
        amount = message.stored_message.message.amount
        with engine.connect() as conn:
            conn.exec_driver_sql(f"INSERT INTO effects_{suffix} VALUES (%s)", (amount,))
            message.ack.execute(conn=conn)
            if amount in crash_on:
                crash_on.clear()
                raise RuntimeError("crash before commit")  # rolls back effect and ack
            conn.commit()

    subscription = stream.subscription(f"sub_{suffix}", handlers=handlers, batch_size=5)
    with pytest.raises(RuntimeError, match="crash before commit"):
        subscription.runner.run_once()
    _run(subscription)
    with engine.connect() as conn:
        effects = conn.exec_driver_sql(f"SELECT amount FROM effects_{suffix}").scalars().all()
    # The primary key would have failed on a second insert: every effect exactly once.
    assert sorted(effects) == list(range(60))
    subscription.close()


def test_uncommitted_ack_in_callers_transaction_stops_and_redelivers(
    stream: Stream, engine: sa.Engine, suffix: str
) -> None:
    subscription = stream.subscription(f"sub_{suffix}")
    first = None
    with engine.connect() as conn:
        with conn.begin() as tx:
            for message in subscription.get_next_messages(count=3):
                first = message.stored_message.message_id
                message.ack.execute(conn=conn)
            tx.rollback()
    assert first is not None
    # The partition's first message comes again (other partitions may come before it).
    seen: list[uuid.UUID] = []
    while len(seen) < 60:
        batch = subscription.get_next_message_batch(count=1)
        assert batch is not None
        seen.append(batch.messages[0].stored_message.message_id)
        subscription.unlock_message_batch(batch)
        if seen[-1] == first:
            break
    assert seen[-1] == first
    subscription.close()


@pytest.mark.timeout(30)
def test_batch_api_acknowledges_and_locks(stream: Stream, engine: sa.Engine, suffix: str) -> None:
    name = f"sub_{suffix}"
    one = stream.subscription(name)
    two = stream.subscription(name)
    batch = one.get_next_message_batch(count=2)
    assert batch is not None and len(batch.messages) == 2
    assert [m.position for m in batch.messages] == [0, 1]
    held = batch.partition
    # While `one` holds the partition, `two` gets every other partition and never it.
    others = []
    while (other := two.get_next_message_batch(count=100)) is not None:
        others.append(other.partition)
        assert other.partition != held
        two.unlock_message_batch(other)
        if len(others) == PARTITIONS - 1:
            break
    assert sorted(others) == sorted(set(range(PARTITIONS)) - {held})

    batch.ack(batch.messages[0])
    one.ack_message_batch(batch, success=True)
    assert _state(engine, name)[held] == 0
    nxt = two.get_next_message_batch(count=1)
    while nxt is not None and nxt.partition != held:
        two.unlock_message_batch(nxt)
        nxt = two.get_next_message_batch(count=1)
    assert nxt is not None and nxt.first_position == 1
    two.unlock_message_batch(nxt)
    assert _state(engine, name)[held] == 0
    one.close()
    two.close()


def test_nothing_acknowledged_stores_nothing(
    stream: Stream, engine: sa.Engine, suffix: str
) -> None:
    name = f"sub_{suffix}"
    subscription = stream.subscription(name)
    batch = subscription.get_next_message_batch(count=5)
    assert batch is not None
    # depeche-db would store -1 here, resetting the partition.
    subscription.ack_message_batch(batch, success=True)
    assert _state(engine, name) == {-1: -1}
    subscription.close()


def test_budget_and_stop(stream: Stream, suffix: str) -> None:
    recorder = Recorder()
    subscription = stream.subscription(f"sub_{suffix}", handlers=recorder.register, batch_size=5)
    result = subscription.runner.run_once(FixedTimeBudget(seconds=0))
    assert result == RunOnNotificationResult.WORK_REMAINING
    assert len(recorder.seen) == 5
    subscription.runner.stop()
    assert subscription.runner.run_once() == RunOnNotificationResult.DONE_FOR_NOW
    assert len(recorder.seen) == 5
    subscription.close()


def test_notification_hint_puts_its_partition_first(stream: Stream, suffix: str) -> None:
    recorder = Recorder()
    subscription = stream.subscription(f"sub_{suffix}", handlers=recorder.register)
    _run(subscription)
    _write(stream.store, 24, start=60)
    _project(stream)
    layout = _layout(stream.store.engine, stream)
    hinted = 3
    subscription.runner.take_notification_hint(
        {"partition": hinted, "position": len(layout[hinted]) - 1, "message_id": "x"}
    )
    subscription.runner.take_notification_hint({"unrelated": True})
    batch = subscription.get_next_message_batch(count=100)
    assert batch is not None and batch.partition == hinted
    subscription.unlock_message_batch(batch)
    subscription.close()


class InMemoryState:
    """A state provider that is not ours (exercises the generic path)."""

    def __init__(self) -> None:
        self.positions: dict[str, dict[int, int]] = {}
        self.ready: set[str] = set()

    def store(self, subscription_name: str, partition: int, position: int) -> None:
        self.positions.setdefault(subscription_name, {})[partition] = position

    def read(self, subscription_name: str) -> SubscriptionState:
        return SubscriptionState(dict(self.positions.get(subscription_name, {})))

    def initialize(self, subscription_name: str) -> None:
        self.ready.add(subscription_name)

    def initialized(self, subscription_name: str) -> bool:
        return subscription_name in self.ready

    def session(self, **kwargs: Any) -> InMemoryState:
        return self


class ThreadLocks:
    def __init__(self) -> None:
        self.held: set[str] = set()
        self.mutex = threading.Lock()

    def lock(self, name: str) -> bool:
        with self.mutex:
            if name in self.held:
                return False
            self.held.add(name)
            return True

    def unlock(self, name: str) -> None:
        with self.mutex:
            self.held.discard(name)


@pytest.mark.parametrize("strategy", [AckStrategy.SINGLE, AckStrategy.BATCHED])
def test_custom_state_and_lock_providers(
    stream: Stream, engine: sa.Engine, suffix: str, strategy: AckStrategy
) -> None:
    state, locks = InMemoryState(), ThreadLocks()
    recorder = Recorder()
    name = f"sub_{suffix}"
    subscription = stream.subscription(
        name,
        handlers=recorder.register,
        state_provider=state,
        lock_provider=locks,
        start_point=StartAtPointInTime(T0 + dt.timedelta(minutes=10)),
        ack_strategy=strategy,
        batch_size=3,
    )
    _run(subscription)
    assert sorted(a for _, _, a in recorder.seen) == list(range(10, 60))
    layout = _layout(engine, stream)
    assert state.positions[name] == {p: len(a) - 1 for p, a in layout.items()}
    assert locks.held == set()
    with engine.connect() as conn:
        assert (
            conn.exec_driver_sql(
                "SELECT to_regclass(%s)", (f"depeche_subscriptions_{name}",)
            ).scalar()
            is None
        )
    subscription.close()


def test_threads_sharing_a_subscription_never_share_a_partition(
    stream: Stream, engine: sa.Engine, suffix: str
) -> None:
    subscription = stream.subscription(f"sub_{suffix}")
    seen: list[tuple[int, int, int]] = []
    mutex = threading.Lock()
    busy: dict[int, int] = {}
    overlaps: list[int] = []

    def consume(worker: int) -> None:
        idle = 0
        while idle < 3:
            got = False
            for message in subscription.get_next_messages(count=2):
                got = True
                with mutex:
                    if busy.setdefault(message.partition, worker) != worker:
                        overlaps.append(message.partition)
                    seen.append((message.partition, message.position, worker))
                with mutex:
                    busy.pop(message.partition, None)
            idle = 0 if got else idle + 1

    threads = [threading.Thread(target=consume, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert overlaps == []
    layout = _layout(engine, stream)
    for partition, amounts in layout.items():
        assert [pos for p, pos, _ in seen if p == partition] == list(range(len(amounts)))
    subscription.close()


def test_message_missing_from_the_store_is_skipped(
    stream: Stream, engine: sa.Engine, suffix: str
) -> None:
    name = f"sub_{suffix}"
    layout = _layout(engine, stream)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"DELETE FROM depeche_msgs_{stream.store.name} "
            "WHERE (message->>'amount')::int IN (%s, %s)",
            (layout[0][0], layout[1][3]),
        )
    recorder = Recorder()
    subscription = stream.subscription(name, handlers=recorder.register, batch_size=10)
    _run(subscription)
    assert sorted(a for _, _, a in recorder.seen) == sorted(
        set(range(60)) - {layout[0][0], layout[1][3]}
    )
    assert _state(engine, name) == {-1: -1, **{p: len(a) - 1 for p, a in layout.items()}}
    subscription.close()


def test_undeserializable_message_is_a_clear_error_and_releases_the_lock(
    stream: Stream, engine: sa.Engine, suffix: str
) -> None:
    layout = _layout(engine, stream)
    _make_unreadable(engine, stream, layout[0][2])
    recorder = Recorder()
    name = f"sub_{suffix}"
    subscription = stream.subscription(name, handlers=recorder.register, batch_size=10)
    with pytest.raises(SerializationError, match=r"cannot deserialize message .* position 2"):
        while True:
            subscription.runner.run_once()
    # The two messages before it were delivered and acknowledged.
    assert [pos for p, pos, _ in recorder.seen if p == 0] == [0, 1]
    assert _state(engine, name)[0] == 1
    # The lock was released: another consumer reaches the message (and fails the same way).
    other = stream.subscription(name)
    with pytest.raises(SerializationError):
        for _ in range(2 * PARTITIONS):
            batch = other.get_next_message_batch(count=1)
            if batch is not None:
                other.unlock_message_batch(batch)
    subscription.close()
    other.close()


def test_db_lock_provider(dsn: str, engine: sa.Engine, suffix: str) -> None:
    one = DbLockProvider(f"locks_{suffix}", engine)
    two = DbLockProvider(f"locks_{suffix}", dsn)
    assert one.lock("a") is True
    assert one.lock("a") is False  # held through this provider already
    assert two.lock("a") is False  # held by another connection
    assert two.lock("b") is True
    one.unlock("a")
    assert two.lock("a") is True
    # The key is pals' (depeche-db's lock library): sha1("<app>.<name>")[:8], little endian.
    digest = hashlib.sha1(f"locks_{suffix}.a".encode()).digest()
    assert one.key("a") == struct.unpack("<q", digest[:8])[0]
    with psycopg.connect(dsn, autocommit=True) as conn:
        held = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
            "((classid::bigint << 32) | objid::bigint) = %s",
            (one.key("a"),),
        ).fetchone()
    assert held == (1,)
    two.finalize()
    # Closing the connection releases its locks once the server has seen it go.
    deadline = time.monotonic() + 10
    while not one.lock("a"):
        assert time.monotonic() < deadline, "the lock outlived its connection"
        time.sleep(0.01)
    one.finalize()


def test_db_subscription_state_provider(engine: sa.Engine, suffix: str) -> None:
    provider = DbSubscriptionStateProvider(f"st_{suffix}", engine)
    assert provider.initialized("x") is False
    provider.store("x", 0, 5)
    provider.store("x", 0, 7)
    provider.store("y", 1, 2)
    provider.initialize("x")
    assert provider.initialized("x") is True
    assert provider.read("x") == SubscriptionState({0: 7})
    with engine.connect() as conn:
        session = provider.session(conn=conn)
        session.store("x", 1, 3)
        assert session.read("x") == SubscriptionState({0: 7, 1: 3})
        assert provider.read("x") == SubscriptionState({0: 7})
        conn.rollback()
    assert provider.read("x") == SubscriptionState({0: 7})
    with pytest.raises(TypeError, match="needs conn"):
        provider.session()
    with pytest.raises(InvalidNameError):
        DbSubscriptionStateProvider("no-dashes", engine)


@pytest.mark.parametrize("prefix", ["old", "Old"])
def test_state_table_migration_from_0_8(engine: sa.Engine, suffix: str, prefix: str) -> None:
    # depeche-db <= 0.8 created the table through SQLAlchemy: a name with capitals quoted.
    name = f"{prefix}_{suffix}"
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f'CREATE TABLE "{name}_subscription_state" (subscription_name varchar, '
            "partition int, position int, PRIMARY KEY (subscription_name, partition))"
        )
        conn.exec_driver_sql(f"""INSERT INTO "{name}_subscription_state" VALUES ('s', 0, 9)""")
    for _ in range(2):
        with engine.begin() as conn:
            DbSubscriptionStateProvider.migrate_db_objects(name, conn)
    assert DbSubscriptionStateProvider(name, engine).read("s") == SubscriptionState({0: 9})


def test_drop_in_names() -> None:
    # What depeche-db users import, under the same names.
    for attr in (
        "AckStrategy",
        "BatchedAckSubscriptionRunner",
        "Executor",
        "ExitSubscriptionErrorHandler",
        "LogAndIgnoreSubscriptionErrorHandler",
        "MessageHandler",
        "MessageHandlerRegister",
        "StartAtNextMessage",
        "StartAtPointInTime",
        "Subscription",
        "SubscriptionMessageHandler",
        "SubscriptionRunner",
    ):
        assert attr in depeche_rs.__all__
    for attr in ("DbLockProvider", "DbSubscriptionStateProvider", "PgNotificationListener"):
        assert attr in depeche_rs.tools.__all__
    assert StoredMessage is depeche_rs.StoredMessage


def _backends(dsn: str, name: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = 'depeche-rs subscription' AND query LIKE %s",
            (f"%{name}%",),
        ).fetchone()
    return row[0] if row else 0


@pytest.mark.parametrize("strategy", [AckStrategy.SINGLE, AckStrategy.BATCHED])
def test_terminated_subscription_connection_loses_nothing(
    stream: Stream, engine: sa.Engine, dsn: str, suffix: str, strategy: AckStrategy
) -> None:
    name = f"sub_{suffix}"
    layout = _layout(engine, stream)
    terminated: list[int] = []

    def terminate_own_connection(message: SubscriptionMessage[Any]) -> bool:
        if (message.partition, message.position) == (0, 2) and not terminated:
            with psycopg.connect(dsn, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = 'depeche-rs subscription' AND query LIKE %s",
                    (f"%{name}%",),
                ).fetchone()
            assert row is not None
            terminated.append(row[0])
            # Gone for sure: the subscription must notice before the next message.
            deadline = time.monotonic() + 10
            while _backends(dsn, name):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        return False

    recorder = Recorder(fail=terminate_own_connection)
    subscription = stream.subscription(
        name, handlers=recorder.register, batch_size=10, ack_strategy=strategy
    )
    with pytest.raises(depeche_rs.DatabaseConnectionError):
        subscription.runner.run_once()
    assert terminated == [1]
    stored = _state(engine, name).get(0, -1)
    assert stored <= 2
    _run(subscription)
    counts: dict[tuple[int, int], int] = {}
    for partition, position, _ in recorder.seen:
        counts[partition, position] = counts.get((partition, position), 0) + 1
    assert set(counts) == {(p, pos) for p, a in layout.items() for pos in range(len(a))}
    # Redelivered: exactly what was handled after the last committed acknowledgement.
    assert sorted(k for k, n in counts.items() if n > 1) == [
        (0, pos) for pos in range(stored + 1, 3)
    ]
    assert _state(engine, name) == {-1: -1, **{p: len(a) - 1 for p, a in layout.items()}}
    subscription.close()


def test_partition_locked_with_depeche_dbs_key_elsewhere_is_skipped_until_released(
    stream: Stream, engine: sa.Engine, dsn: str, suffix: str
) -> None:
    name = f"sub_{suffix}"
    layout = _layout(engine, stream)
    held = min(layout)
    # What a depeche-db consumer of the same subscription holds while it reads `held`.
    digest = hashlib.sha1(f"{name}.subscription-{name}-{held}".encode()).digest()
    key = struct.unpack("<q", digest[:8])[0]
    recorder = Recorder()
    subscription = stream.subscription(name, handlers=recorder.register, batch_size=4)
    with psycopg.connect(dsn, autocommit=True) as other:
        assert other.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone() == (True,)
        _run(subscription)
        assert held not in recorder.by_partition()
        assert recorder.by_partition() == {p: a for p, a in layout.items() if p != held}
        assert held not in _state(engine, name)
        # Released now (a closed session's locks go only when its backend has exited).
        assert other.execute("SELECT pg_advisory_unlock(%s)", (key,)).fetchone() == (True,)
    _run(subscription)
    assert recorder.by_partition() == layout
    assert _state(engine, name) == {-1: -1, **{p: len(a) - 1 for p, a in layout.items()}}
    subscription.close()


@pytest.mark.parametrize("strategy", [AckStrategy.SINGLE, AckStrategy.BATCHED])
def test_own_lock_provider_with_the_default_state_table(
    stream: Stream, engine: sa.Engine, suffix: str, strategy: AckStrategy
) -> None:
    # A user-supplied lock provider sends the reads through the provider reader; the
    # default state provider is then used through its own interface, same table.
    name = f"sub_{suffix}"
    locks = ThreadLocks()
    recorder = Recorder()
    subscription = stream.subscription(
        name, handlers=recorder.register, lock_provider=locks, ack_strategy=strategy, batch_size=3
    )
    _run(subscription)
    layout = _layout(engine, stream)
    assert recorder.by_partition() == layout
    assert _state(engine, name) == {-1: -1, **{p: len(a) - 1 for p, a in layout.items()}}
    assert locks.held == set()
    _run(subscription)
    assert len(recorder.seen) == sum(len(a) for a in layout.values())
    subscription.close()


def test_delivered_message_ids_are_plain_uuids(stream: Stream, suffix: str) -> None:
    """The engine builds `uuid.UUID`s without `UUID.__init__`: each must be what
    `UUID(int=...)` gives, in every way a handler may use it."""
    written = {m.message_id for i in range(12) for m in stream.store.read(f"acc-{i}")}
    assert len(written) == 60
    seen: list[uuid.UUID] = []
    subscription = stream.subscription(f"sub_{suffix}")
    while (batch := subscription.get_next_message_batch(count=10)) is not None:
        for m in batch.messages:
            seen.append(m.stored_message.message_id)
            batch.ack(m)
        subscription.ack_message_batch(batch, success=True)
    assert sorted(seen) == sorted(written)
    for message_id in seen:
        same = uuid.UUID(int=message_id.int)
        assert type(message_id) is uuid.UUID
        assert message_id == same and hash(message_id) == hash(same)
        assert str(message_id) == str(same) and message_id.is_safe is uuid.SafeUUID.unknown
        assert pickle.loads(pickle.dumps(message_id)) == same
        assert copy.deepcopy(message_id) == same
        with pytest.raises(TypeError):
            message_id.int = 0  # type: ignore[misc]
    subscription.close()


def test_batched_unreadable_message_mid_batch_ends_it_and_fails_the_next(
    stream: Stream, engine: sa.Engine, suffix: str
) -> None:
    """Messages are deserialized one at a time, as their turn comes: the messages before
    an unreadable one are handled and acknowledged, and it is the first of the next batch,
    where it is a clear error."""
    layout = _layout(engine, stream)
    _make_unreadable(engine, stream, layout[1][3])
    recorder = Recorder()
    subscription = stream.subscription(
        f"sub_{suffix}", handlers=recorder.register, batch_size=10, ack_strategy=AckStrategy.BATCHED
    )
    with pytest.raises(SerializationError, match=r"at partition 1 position 3"):
        for _ in range(3 * PARTITIONS):
            subscription.runner.run_once()
    assert [pos for p, pos, _ in recorder.seen if p == 1] == [0, 1, 2]
    assert _state(engine, f"sub_{suffix}")[1] == 2
    subscription.close()


def _locks_held(dsn: str, name: str) -> list[int]:
    """The partitions whose depeche-db lock some session holds for subscription `name`."""
    keys = {advisory_lock_key(name, f"subscription-{name}-{p}"): p for p in range(PARTITIONS)}
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT (classid::int8 << 32) | objid::int8 FROM pg_locks "
            "WHERE locktype = 'advisory' AND granted AND objsubid = 1"
        ).fetchall()
    held = []
    for (value,) in rows:
        signed = value - (1 << 64) if value >= 1 << 63 else value
        if signed in keys:
            held.append(keys[signed])
    return sorted(held)


@pytest.mark.parametrize("strategy", [AckStrategy.SINGLE, AckStrategy.BATCHED])
@pytest.mark.parametrize("ending", ["budget", "stop", "error"])
def test_the_partition_claimed_ahead_is_given_up_when_a_run_ends_early(
    stream: Stream, engine: sa.Engine, dsn: str, suffix: str, strategy: AckStrategy, ending: str
) -> None:
    """A runner locks and reads the next partition while it handles a batch. When the
    run ends after that batch (budget over, `stop()`, a handler's error), the partition
    read ahead is unlocked at once and nothing of it is delivered or acknowledged; the
    next run, or another consumer, reads it."""
    name = f"sub_{suffix}"
    layout = _layout(engine, stream)
    assert len(layout) == PARTITIONS

    def end(message: SubscriptionMessage[Any]) -> bool:
        if message.position == 1 and len(recorder.seen) == 1:
            if ending == "stop":
                subscription.runner.stop()
            return ending == "error"
        return False

    recorder = Recorder(fail=end)
    subscription = stream.subscription(
        name,
        handlers=recorder.register,
        batch_size=2,
        ack_strategy=strategy,
        error_handler=ExitSubscriptionErrorHandler(),
    )
    budget = FixedTimeBudget(seconds=0) if ending == "budget" else None
    if ending == "error":
        with pytest.raises(RuntimeError, match="failing at"):
            subscription.runner.run_once(budget)
    else:
        subscription.runner.run_once(budget)
    first = recorder.seen[0][0]
    assert {p for p, _, _ in recorder.seen} == {first}
    # Only the first partition was touched; no lock is left behind.
    assert _locks_held(dsn, name) == []
    handled = 1 if ending == "error" else 2
    assert _state(engine, name).get(first, -1) == handled - 1
    assert all(_state(engine, name).get(p, -1) == -1 for p in layout if p != first)
    # Another consumer of the subscription gets every other partition now.
    other = stream.subscription(name)
    claimed = []
    while (batch := other.get_next_message_batch(count=100)) is not None:
        claimed.append(batch.partition)
        other.unlock_message_batch(batch)
        if len(claimed) == len(layout):
            break
    assert sorted(claimed) == sorted(layout)
    other.close()
    # And a later run delivers the rest, each message once.
    if ending == "stop":
        subscription.close()
        subscription = stream.subscription(
            name, handlers=recorder.register, batch_size=2, ack_strategy=strategy
        )
    recorder.fail = None
    _run(subscription)
    assert recorder.by_partition() == layout
    assert _state(engine, name) == {-1: -1, **{p: len(a) - 1 for p, a in layout.items()}}
    subscription.close()
