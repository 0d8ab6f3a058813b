"""MessageStore: writes, reads, optimistic concurrency, transactions, bad input."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import depeche_rs
from depeche_rs import MessagePosition, MessageStore, StoredMessage
from depeche_rs.tools import PydanticMessageSerializer

from ._models import AccountCreated, AnyEvent, Deposited

Store = MessageStore[AnyEvent]


def test_write_returns_positions_and_read_returns_messages(store: Store) -> None:
    a = AccountCreated(account=1)
    b = Deposited(account=1, amount=10)
    c = AccountCreated(account=2)
    assert store.write("account-1", a) == MessagePosition("account-1", 1, 1)
    assert store.write("account-1", b) == MessagePosition("account-1", 2, 2)
    assert store.write("account-2", c) == MessagePosition("account-2", 1, 3)

    read = list(store.read("account-1"))
    assert [m.message for m in read] == [a, b]
    assert [(m.stream, m.version, m.global_position) for m in read] == [
        ("account-1", 1, 1),
        ("account-1", 2, 2),
    ]
    assert all(isinstance(m, StoredMessage) for m in read)
    assert read[0].message_id == a.event_id
    assert read[0].added_at.tzinfo is None
    assert [m.message for m in store.read("account-1", min_version=2)] == [b]
    assert list(store.read("nope")) == []


def test_expected_version_conflict_names_stream_and_versions(store: Store) -> None:
    store.write("s", AccountCreated(account=1), expected_version=0)
    store.write("s", AccountCreated(account=1), expected_version=1)
    with pytest.raises(depeche_rs.OptimisticConcurrencyError) as info:
        store.write("s", AccountCreated(account=1), expected_version=1)
    assert info.value.stream == "s"
    assert info.value.expected_version == 1
    assert info.value.actual_version == 2
    assert "'s'" in str(info.value) and "2" in str(info.value)
    with pytest.raises(depeche_rs.OptimisticConcurrencyError):
        store.write("new", AccountCreated(account=1), expected_version=3)
    assert len(list(store.read("s"))) == 2
    assert list(store.read("new")) == []


def test_write_many_is_one_atomic_append_in_version_order(store: Store) -> None:
    events = [Deposited(account=1, amount=i) for i in range(5)]
    assert store.write_many("acc", events, expected_version=0) == MessagePosition("acc", 5, 5)
    stored = list(store.read("acc"))
    assert [m.message for m in stored] == events
    assert [m.version for m in stored] == [1, 2, 3, 4, 5]
    assert [m.global_position for m in stored] == [1, 2, 3, 4, 5]
    with pytest.raises(depeche_rs.OptimisticConcurrencyError):
        store.write_many("acc", [Deposited(account=1, amount=9)] * 2, expected_version=4)
    assert len(list(store.read("acc"))) == 5


def test_global_positions_follow_versions_within_a_stream(store: Store) -> None:
    store.write("x", AccountCreated(account=0))
    store.write_many("y", [AccountCreated(account=i) for i in range(50)])
    store.write_many("x", [AccountCreated(account=i) for i in range(50)])
    for stream in ("x", "y"):
        stored = list(store.read(stream))
        positions = [m.global_position for m in stored]
        assert positions == sorted(positions)
        assert [m.version for m in stored] == list(range(1, len(stored) + 1))


def test_synchronize_appends_only_missing_messages(store: Store) -> None:
    events = [AccountCreated(account=1), Deposited(account=1, amount=5)]
    assert store.synchronize("acc", 0, events[:1]) == MessagePosition("acc", 1, 1)
    assert store.synchronize("acc", 1, events) == MessagePosition("acc", 2, 2)
    assert store.synchronize("acc", 2, events) == MessagePosition("acc", 2, 2)
    assert [m.message for m in store.read("acc")] == events
    assert store.synchronize("empty", 0, []) == MessagePosition("empty", 0, None)
    with pytest.raises(depeche_rs.MessageIdMismatchError):
        store.synchronize("acc", 2, [AccountCreated(account=1), *events])
    with pytest.raises(depeche_rs.OptimisticConcurrencyError):
        store.synchronize("acc", 1, [*events, AccountCreated(account=3)])


def test_reader_methods(store: Store) -> None:
    a, b, c = AccountCreated(account=1), AccountCreated(account=2), AccountCreated(account=3)
    store.write("acc-1", a)
    store.write("acc-2", b)
    store.write("other", c)
    with store.reader() as reader:
        got = reader.get_message_by_id(b.event_id)
        assert (got.message, got.stream, got.version, got.global_position) == (b, "acc-2", 1, 2)
        with pytest.raises(depeche_rs.MessageNotFound):
            reader.get_message_by_id(uuid.uuid4())
        many = list(reader.get_messages_by_ids([c.event_id, uuid.uuid4(), a.event_id]))
        assert [m.message for m in many] == [c, a]
        assert [m.message for m in reader.read("acc-1")] == [a]
        assert [m.message for m in reader.read_wildcard("acc-%")] == [a, b]
        assert [m.message for m in reader.read_wildcard("%")] == [a, b, c]
        assert list(reader.get_messages_by_ids([])) == []


def test_truncate_deletes_everything(store: Store) -> None:
    store.write("a", AccountCreated(account=1))
    store.truncate()
    assert list(store.read("a")) == []
    assert store.write("a", AccountCreated(account=1)).version == 1


def test_write_with_conn_joins_the_callers_transaction(store: Store, engine: sa.Engine) -> None:
    event = AccountCreated(account=1)
    with engine.connect() as conn:
        position = store.write("tx", event, conn=conn)
        assert position.version == 1
        assert list(store.read("tx")) == []  # invisible until the caller commits
        conn.commit()
    assert [m.message for m in store.read("tx")] == [event]

    with engine.connect() as conn:
        store.write("tx", AccountCreated(account=2), conn=conn)
        store.write_many("tx2", [AccountCreated(account=3)], conn=conn)
        conn.rollback()
    assert len(list(store.read("tx"))) == 1
    assert list(store.read("tx2")) == []


def test_outbox_write_commits_with_business_rows(store: Store, engine: sa.Engine) -> None:
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE TABLE biz_{store.name} (id int)")
        conn.commit()
        conn.exec_driver_sql(f"INSERT INTO biz_{store.name} VALUES (1)")
        store.write("outbox", AccountCreated(account=1), conn=conn)
        conn.commit()
        assert conn.exec_driver_sql(f"SELECT count(*) FROM biz_{store.name}").scalar() == 1
        conn.exec_driver_sql(f"DROP TABLE biz_{store.name}")
        conn.commit()
    assert len(list(store.read("outbox"))) == 1


def test_concurrent_writers_exactly_one_wins_per_version(store: Store) -> None:
    n_threads, rounds = 8, 15
    wins: list[tuple[int, int]] = []
    losses = 0
    lock = threading.Lock()
    barrier = threading.Barrier(n_threads)

    def writer(worker: int) -> None:
        nonlocal losses
        for version in range(rounds):
            barrier.wait()
            try:
                store.write(
                    "race", Deposited(account=worker, amount=version), expected_version=version
                )
                with lock:
                    wins.append((version, worker))
            except depeche_rs.OptimisticConcurrencyError:
                with lock:
                    losses += 1

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(v for v, _ in wins) == list(range(rounds))
    assert losses == rounds * (n_threads - 1)
    stored = list(store.read("race"))
    assert [m.version for m in stored] == list(range(1, rounds + 1))
    winners = dict(wins)
    assert [m.message.account for m in stored] == [winners[v] for v in range(rounds)]


def test_concurrent_writers_without_expected_version_never_collide(store: Store) -> None:
    def writer(worker: int) -> None:
        for i in range(20):
            store.write("busy", Deposited(account=worker, amount=i))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = list(store.read("busy"))
    assert [m.version for m in stored] == list(range(1, 121))
    for worker in range(6):
        assert [m.message.amount for m in stored if m.message.account == worker] == list(range(20))


def test_dsn_string_engine(dsn: str, store_name: str, serializer: Any) -> None:
    store = MessageStore(store_name, dsn, serializer)
    store.write("a", AccountCreated(account=1))
    assert [m.version for m in store.read("a")] == [1]


def test_store_construction_is_idempotent_and_concurrent(
    engine: sa.Engine, store_name: str, serializer: Any
) -> None:
    errors: list[BaseException] = []

    def build() -> None:
        try:
            MessageStore(store_name, engine, serializer)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    again = MessageStore(store_name, engine, serializer)
    again.write("x", AccountCreated(account=1))
    assert len(list(again.read("x"))) == 1


@pytest.mark.parametrize(
    "name",
    ["", "1abc", "a-b", "x; DROP TABLE users", "a b", "naïve", "x" * 40, None, 5],
)
def test_invalid_store_names(engine: sa.Engine, serializer: Any, name: Any) -> None:
    with pytest.raises(depeche_rs.InvalidNameError) as info:
        MessageStore(name, engine, serializer)
    assert isinstance(info.value, ValueError)


def test_bad_messages_write_nothing(store: Store, engine: sa.Engine) -> None:
    class NoId:
        def get_message_time(self) -> Any:
            return None

    with pytest.raises(depeche_rs.InvalidMessageError) as info:
        store.write("bad", NoId())  # type: ignore[arg-type]
    assert "get_message_id" in str(info.value)
    assert isinstance(info.value, TypeError)

    class Exploding:
        def serialize(self, message: Any) -> dict[str, Any]:
            raise RuntimeError("boom")

        def deserialize(self, message: dict[str, Any]) -> Any:
            raise AssertionError

    class NotJson:
        def serialize(self, message: Any) -> Any:
            return {"when": object()}

        def deserialize(self, message: dict[str, Any]) -> Any:
            raise AssertionError

    class NotDict:
        def serialize(self, message: Any) -> Any:
            return [1, 2]

        def deserialize(self, message: dict[str, Any]) -> Any:
            raise AssertionError

    for bad, text in [(Exploding(), "boom"), (NotJson(), "not JSON"), (NotDict(), "dict")]:
        bad_store: MessageStore[Any] = MessageStore(store.name, engine, bad)
        with pytest.raises(depeche_rs.SerializationError) as err:
            bad_store.write_many("bad", [AccountCreated(account=1), AccountCreated(account=2)])
        assert text in str(err.value)
    assert list(store.read("bad")) == []
    with pytest.raises(depeche_rs.InvalidNameError):
        store.write("", AccountCreated(account=1))
    with pytest.raises(depeche_rs.InvalidNameError):
        store.write("x" * 256, AccountCreated(account=1))
    with pytest.raises(ValueError):
        store.write_many("bad", [])
    assert list(store.read("bad")) == []


def test_duplicate_message_id_is_rejected_and_writes_nothing(store: Store) -> None:
    event = AccountCreated(account=1)
    store.write("a", event)
    with pytest.raises(sa.exc.IntegrityError):
        store.write_many("b", [AccountCreated(account=2), event])
    assert list(store.read("b")) == []


def test_unreachable_dsn_raises_connection_error(store_name: str, serializer: Any) -> None:
    with pytest.raises(depeche_rs.DatabaseConnectionError) as info:
        MessageStore(store_name, "postgresql://nobody:secret@127.0.0.1:1/nothing", serializer)
    assert isinstance(info.value, ConnectionError)
    assert "secret" not in str(info.value)


def test_wrong_engine_type(store_name: str, serializer: Any) -> None:
    with pytest.raises(TypeError):
        MessageStore(store_name, 42, serializer)


def test_pydantic_serializer_wire_format(serializer: PydanticMessageSerializer[Any]) -> None:
    event = Deposited(account=3, amount=7)
    data = serializer.serialize(event)
    assert data == {
        "event_id": str(event.event_id),
        "happened_at": event.happened_at.isoformat().replace("+00:00", "Z"),
        "account": 3,
        "amount": 7,
        "__typename__": "Deposited",
    }
    assert serializer.deserialize(data) == event
    assert "__typename__" in data  # deserialize must not mutate its input
    with pytest.raises(TypeError):
        serializer.deserialize({"__typename__": "Unknown"})
    with pytest.raises(ValueError):
        PydanticMessageSerializer(AnyEvent, aliases={"Deposited": Deposited})
    aliased = PydanticMessageSerializer(AnyEvent, aliases={"OldCreated": AccountCreated})
    assert aliased.deserialize(
        {
            **serializer.serialize(
                AccountCreated(account=1, event_id=event.event_id, happened_at=event.happened_at)
            ),
            "__typename__": "OldCreated",
        }
    ) == AccountCreated(account=1, event_id=event.event_id, happened_at=event.happened_at)


def test_schema_2_per_name_notify_triggers_are_replaced_by_shared_ones(
    store: Store, engine: sa.Engine, serializer: Any, dsn: str
) -> None:
    t = f"depeche_msgs_{store.name}"
    old = f"depeche_rs_msgs_notify_{store.name}"
    with engine.begin() as conn:  # what schema 2 left: a per-store function and trigger
        conn.exec_driver_sql(f"DROP TRIGGER depeche_rs_notify_messages ON {t}")
        conn.exec_driver_sql(
            f"CREATE FUNCTION {old}() RETURNS trigger AS $$ BEGIN RETURN NULL; END; $$ "
            f"LANGUAGE plpgsql; CREATE TRIGGER {old} AFTER INSERT ON {t} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {old}(); "
            f"COMMENT ON TABLE {t} IS 'depeche-rs schema 2'"
        )
    for _ in range(2):  # idempotent
        again = MessageStore(store.name, engine, serializer)
    with engine.connect() as conn:
        triggers = conn.exec_driver_sql(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal "
            "ORDER BY 1",
            (t,),
        ).scalars()
        functions = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_proc WHERE proname = %s", (old,)
        ).scalar()
        assert list(triggers) == [
            "depeche_rs_notify_messages",
            "depeche_rs_stamp_tx",
            "depeche_rs_upkeep_meta",
        ]
    assert functions == 0
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN depeche_{store.name}_messages")
        again.write_many("acc-1", [AccountCreated(account=1), AccountCreated(account=2)])
        assert len(list(listener.notifies(timeout=1.0))) == 2
