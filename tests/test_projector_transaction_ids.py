"""The transaction ids the projector relies on: every way a row can reach the message
table stores the id of the transaction that inserted it (so copied rows cannot carry an
id that hides them from the projector), and an id held open in another database of the
cluster loses nothing."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from depeche_rs.tools import StreamHashPartitioner

from ._models import AnyEvent, Deposited
from ._operations import Store, assert_projection, private_database, write


@dataclasses.dataclass(frozen=True)
class CopiedRow:
    """A message row as a copy script brings it in, with the `tx` it claims."""

    message_id: uuid.UUID
    global_position: int
    stream: str
    message: str
    tx: str | None
    added_at: dt.datetime = dataclasses.field(
        default_factory=lambda: dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    )


def _claimed_tx(conn: sa.Connection, table: str, claim: str) -> str | None:
    """A forged `tx`: an old committed transaction's id, one from the future, or none."""
    if claim == "null":
        return None
    if claim == "old":
        return str(conn.exec_driver_sql(f"SELECT min(tx)::text FROM {table}").scalar())
    return str(conn.exec_driver_sql("SELECT pg_current_xact_id()::text::int8 + 1000000").scalar())


def _copied_rows(
    conn: sa.Connection, store: str, serializer: Any, streams: list[str], claim: str
) -> list[CopiedRow]:
    """Version 1 of each of `streams`, global positions drawn now, with a forged `tx`."""
    table = f"depeche_msgs_{store}"
    tx = _claimed_tx(conn, table, claim)
    positions = (
        conn.exec_driver_sql(
            f"SELECT nextval('{table}_global_seq') FROM generate_series(1, %s)", (len(streams),)
        )
        .scalars()
        .all()
    )
    events = [Deposited(account=i, amount=0) for i in range(len(streams))]
    return [
        CopiedRow(e.event_id, gp, s, json.dumps(serializer.serialize(e)), tx)
        for e, gp, s in zip(events, positions, streams, strict=True)
    ]


_COLUMNS = "message_id, global_position, added_at, stream, version, message, tx"


def _values(row: CopiedRow) -> tuple[Any, ...]:
    return (row.message_id, row.global_position, row.added_at, row.stream, 1, row.message, row.tx)


def _plain_insert(conn: sa.Connection, table: str, rows: list[CopiedRow]) -> None:
    for row in rows:
        conn.exec_driver_sql(
            f"INSERT INTO {table} ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s::xid8)",
            _values(row),
        )


def _insert_select_from_archive(conn: sa.Connection, table: str, rows: list[CopiedRow]) -> None:
    conn.exec_driver_sql(f"CREATE TEMP TABLE archive (LIKE {table}) ON COMMIT DROP")
    _plain_insert(conn, "archive", rows)
    conn.exec_driver_sql(f"INSERT INTO {table} ({_COLUMNS}) SELECT {_COLUMNS} FROM archive")


def _copy(conn: sa.Connection, table: str, rows: list[CopiedRow]) -> None:
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    with driver.cursor() as cur, cur.copy(f"COPY {table} ({_COLUMNS}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(_values(row))


def _as_replication_apply_worker(conn: sa.Connection, table: str, rows: list[CopiedRow]) -> None:
    conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
    _plain_insert(conn, table, rows)


FORGING_INSERTS: dict[str, Callable[[sa.Connection, str, list[CopiedRow]], None]] = {
    "insert": _plain_insert,
    "insert-select": _insert_select_from_archive,
    "copy": _copy,
    "replication-role-replica": _as_replication_apply_worker,
}
forging_inserts = pytest.mark.parametrize(
    "insert", list(FORGING_INSERTS.values()), ids=list(FORGING_INSERTS)
)
claims = pytest.mark.parametrize("claim", ["old", "future", "null"])


def _stored_tx(conn: sa.Connection, table: str, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    return dict(
        conn.exec_driver_sql(
            f"SELECT message_id, tx::text FROM {table} WHERE message_id = ANY(%s)", (ids,)
        ).all()
    )


def _own_tx(conn: sa.Connection) -> str:
    return str(conn.exec_driver_sql("SELECT pg_current_xact_id()::text").scalar())


@forging_inserts
@claims
def test_inserted_rows_store_the_inserting_transaction_id(
    store: Store, engine: sa.Engine, serializer: Any, insert: Any, claim: str
) -> None:
    write(store, "acc-0")
    table = f"depeche_msgs_{store.name}"
    with engine.connect() as conn:
        rows = _copied_rows(conn, store.name, serializer, ["acc-1", "acc-2"], claim)
        insert(conn, table, rows)
        own = _own_tx(conn)
        stored = _stored_tx(conn, table, [r.message_id for r in rows])
        conn.commit()
    assert own != rows[0].tx
    assert stored == {r.message_id: own for r in rows}


def test_a_data_fix_update_cannot_set_tx_either(store: Store, engine: sa.Engine) -> None:
    [message_id] = write(store, "acc-1")
    table = f"depeche_msgs_{store.name}"
    with engine.connect() as conn:
        conn.exec_driver_sql(f"UPDATE {table} SET tx = '3' WHERE message_id = %s", (message_id,))
        own = _own_tx(conn)
        assert _stored_tx(conn, table, [message_id]) == {message_id: own}
        conn.commit()


@claims
def test_an_insert_with_the_stamping_trigger_disabled_is_refused(
    store: Store, engine: sa.Engine, serializer: Any, claim: str
) -> None:
    write(store, "acc-0")
    table = f"depeche_msgs_{store.name}"
    with engine.connect() as conn:
        rows = _copied_rows(conn, store.name, serializer, ["acc-1"], claim)
        conn.exec_driver_sql(f"ALTER TABLE {table} DISABLE TRIGGER ALL")
        with pytest.raises(sa.exc.IntegrityError, match="depeche_rs_tx_is_local"):
            _plain_insert(conn, table, rows)
        conn.rollback()


def _depeche_db_write_function(store: Store, conn: sa.Connection, stream: str) -> uuid.UUID:
    message_id = uuid.uuid4()
    conn.exec_driver_sql(
        f"SELECT * FROM depeche_write_message_{store.name}(%s, %s, %s::json)",
        (message_id, stream, json.dumps({"amount": 1})),
    )
    return message_id


def _depeche_db_message_store(store: Store, conn: sa.Connection, stream: str) -> uuid.UUID:
    depeche_db = pytest.importorskip("depeche_db")
    db_tools = pytest.importorskip("depeche_db.tools")
    db_store = depeche_db.MessageStore(
        store.name, store.engine, db_tools.PydanticMessageSerializer(AnyEvent)
    )
    event = Deposited(account=1, amount=1)
    db_store.write(stream, event, conn=conn)
    return event.event_id


@pytest.mark.parametrize(
    "depeche_db_write",
    [_depeche_db_write_function, _depeche_db_message_store],
    ids=["sql-write-function", "depeche-db-message-store"],
)
def test_depeche_db_writes_store_the_writing_transaction_id(
    store: Store, engine: sa.Engine, depeche_db_write: Any
) -> None:
    with engine.connect() as conn:
        ids = [depeche_db_write(store, conn, stream) for stream in ("acc-1", "acc-1", "acc-2")]
        own = _own_tx(conn)
        stored = _stored_tx(conn, f"depeche_msgs_{store.name}", ids)
        conn.commit()
    assert stored == dict.fromkeys(ids, own)


@forging_inserts
@claims
def test_copied_rows_committed_after_the_projector_passed_them_are_projected(
    store: Store, stream_name: str, engine: sa.Engine, serializer: Any, insert: Any, claim: str
) -> None:
    agg = store.aggregated_stream(
        stream_name, StreamHashPartitioner(3), ["acc-%"], update_batch_size=4
    )
    write(store, *(f"acc-{i}" for i in range(6)))
    assert agg.projector.update_full() == (6, False)
    with engine.connect() as copier:
        streams = [f"acc-copied-{i}" for i in range(3)]
        insert(
            copier,
            f"depeche_msgs_{store.name}",
            _copied_rows(copier, store.name, serializer, streams, claim),
        )
        write(store, *(f"acc-{i}" for i in range(5)))
        assert agg.projector.update_full() == (5, False)
        copier.commit()
    assert agg.projector.update_full() == (3, False)
    assert_projection(engine, store.name, stream_name, ["acc-%"])


@pytest.fixture()
def other_database(dsn: str, suffix: str) -> Any:
    with private_database(dsn, "other_" + suffix) as url:
        yield url


def test_transaction_open_in_another_database_during_a_catch_up_loses_nothing(
    store: Store, stream_name: str, engine: sa.Engine, other_database: str
) -> None:
    agg = store.aggregated_stream(
        stream_name, StreamHashPartitioner(4), ["acc-%"], update_batch_size=250
    )
    with (
        psycopg.connect(other_database) as holder,
        engine.connect() as late_1,
        engine.connect() as late_2,
    ):
        holder.execute("SELECT pg_current_xact_id()")  # held open until the end
        write(store, "acc-late-1", conn=late_1)
        for chunk in range(12):
            for account in range(25):
                store.write_many(
                    f"acc-{account}", [Deposited(account=account, amount=i) for i in range(10)]
                )
            write(store, f"other-{chunk}")
            if chunk == 3:
                write(store, "acc-late-2", "acc-late-3", conn=late_2)
            if chunk == 6:
                late_1.commit()
            if chunk == 9:
                late_2.commit()
            if chunk % 2:
                agg.projector.update_full()
        agg.projector.update_full()
        rows = assert_projection(engine, store.name, stream_name, ["acc-%"])
        holder.rollback()
    assert len(rows) == 12 * 25 * 10 + 3
