"""`Storage`: the message table's row layer, as depeche-db 0.13.1 exposes it.

Every write of a message, by `MessageStore` or by a caller of `Storage.add`/`add_all`,
goes through `Storage.add_all` and so through the one SQL function
`depeche_rs_write_<store>`: the same per-stream lock, optimistic-concurrency check,
global-position order, transaction id and notifications, whoever writes.
"""

from __future__ import annotations

import datetime as _dt
import json as _json
import re as _re
import uuid as _uuid
from collections.abc import Iterator, Sequence
from typing import Any, cast

import sqlalchemy as _sa
from sqlalchemy.dialects import postgresql as _pg

from .. import _names
from .._db import migrations, schema
from .._db.connection import execute_script, to_engine
from .._exceptions import (
    OCC_SQLSTATE,
    InvalidMessageError,
    NaiveDatetimeError,
    OptimisticConcurrencyError,
    SerializationError,
)
from .._interfaces import MessagePosition

# A JSON escape of NUL (which jsonb cannot store): "\u0000" after an even run of backslashes.
_NUL_ESCAPE = _re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

# (message_id, stream, version, message, global_position, added_at): depeche-db's row.
MessageRow = tuple[_uuid.UUID, str, int, dict[str, Any], int, _dt.datetime]
# The same without the stream (what `read` returns: the caller named the stream).
StreamMessageRow = tuple[_uuid.UUID, int, dict[str, Any], int, _dt.datetime]


class _Xid8(_sa.types.UserDefinedType[int]):
    """PostgreSQL's `xid8` (a 64-bit transaction id), which SQLAlchemy does not know;
    psycopg returns it as text, this type as an int."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "xid8"

    def bind_processor(self, dialect: _sa.Dialect) -> Any:
        # Sent as text, so PostgreSQL casts it to xid8 (there is no xid8 = bigint).
        return lambda value: None if value is None else str(value)

    def result_processor(self, dialect: _sa.Dialect, coltype: object) -> Any:
        return lambda value: None if value is None else int(value)


def _message_table(name: str, metadata: _sa.MetaData) -> _sa.Table:
    """The message table as `schema.store_ddl` creates it (depeche-db's columns, with
    wider global positions, plus the writing transaction's id and the message time)."""
    table = _names.message_table(name)
    return _sa.Table(
        table,
        metadata,
        _sa.Column("message_id", _sa.Uuid(), primary_key=True),
        _sa.Column(
            "global_position",
            _sa.BigInteger,
            server_default=_sa.text(f"nextval('{_names.global_sequence(name)}')"),
            unique=True,
            nullable=False,
        ),
        _sa.Column("added_at", _sa.DateTime, nullable=False, server_default=_sa.func.now()),
        _sa.Column("stream", _sa.String(255), nullable=False),
        _sa.Column("version", _sa.Integer, nullable=False),
        _sa.Column("message", _pg.JSONB, nullable=False),
        # Set by a trigger to the writing transaction's id (docs/projector.md, A1).
        _sa.Column("tx", _Xid8(), server_default=_sa.text("pg_current_xact_id()")),
        # The message's own time when the writer knew it; NULL: the projector asks it.
        _sa.Column("occurred_at", _sa.DateTime(timezone=True)),
        _sa.UniqueConstraint("stream", "version", name=f"{table}_version_uq"),
    )


class Storage:
    """The database objects of one message store, and depeche-db's row methods on them.

    Constructing it creates (or upgrades) the objects. `MessageStore` keeps one as
    `_storage` and writes through it; the row methods take the caller's connection and
    never commit, as depeche-db's do.

    Attributes:
        name: The store name.
        engine: The SQLAlchemy Engine given (or made from a DSN).
        metadata: The SQLAlchemy MetaData holding `message_table`.
        message_table: The message table as a SQLAlchemy `Table`, with every column.
        notification_channel: The channel notified once per message written.
    """

    name: str

    def __init__(self, name: str, engine: Any) -> None:
        self.name = _names.validate_name(name, "store name")
        self.engine: _sa.Engine = to_engine(engine)
        self.notification_channel = self.notification_channel_name(name)
        self.metadata = _sa.MetaData()
        self.message_table = _message_table(name, self.metadata)
        self._write_sql = (
            f"SELECT version, global_position FROM depeche_rs_write_{name}"
            "(%s::uuid[], %s, %s::jsonb[], %s::timestamptz[], %s::bigint)"
        )
        c = self.message_table.c
        self._select = _sa.select(
            c.message_id, c.stream, c.version, c.message, c.global_position, c.added_at
        )
        self._select_without_stream = _sa.select(
            c.message_id, c.version, c.message, c.global_position, c.added_at
        )
        schema.ensure_store(self.engine, name)

    def add(
        self,
        conn: _sa.Connection,
        stream: str,
        expected_version: int | None,
        message_id: _uuid.UUID,
        message: dict[str, Any],
    ) -> MessagePosition:
        """Append one message (a JSON object) to `stream` in the caller's transaction.

        Raises:
            OptimisticConcurrencyError: `expected_version` is given and the stream is not
                at that version (0: a new stream).
        """
        return self.add_all(conn, stream, expected_version, [(message_id, message)])

    def add_all(
        self,
        conn: _sa.Connection,
        stream: str,
        expected_version: int | None,
        messages: Sequence[tuple[_uuid.UUID, dict[str, Any]]],
        *,
        message_times: Sequence[_dt.datetime | None] | None = None,
    ) -> MessagePosition:
        """Append `(message_id, message)` pairs to `stream` in one statement, in the
        caller's transaction (the caller commits). `expected_version` applies to the
        stream before the first message.

        `message_times` (ours, not depeche-db's): each message's own time, aware, or None;
        a message written without one gets it from the projector, which deserializes the
        message and asks `get_message_time()`, as depeche-db's projector does.

        Returns:
            The position of the last message.

        Raises:
            OptimisticConcurrencyError: the stream is not at `expected_version`.
            InvalidNameError: `stream` is empty or longer than 255 characters.
            InvalidMessageError: an id is not a UUID, or an item not a pair.
            SerializationError: a message is not a JSON object PostgreSQL can store.
        """
        check_write(stream, expected_version, messages, "add_all")
        ids, bodies = _encode_pairs(messages)
        times = _message_times(message_times, len(ids))
        params = (ids, stream, bodies, times, expected_version)
        try:
            row = conn.exec_driver_sql(self._write_sql, params).one()
        except _sa.exc.DBAPIError as exc:
            error = _concurrency_error(exc, stream, expected_version)
            if error is None:
                raise
            raise error from exc
        return MessagePosition(stream=stream, version=row[0], global_position=row[1])

    def get_global_position(self, conn: _sa.Connection) -> int:
        """The highest global position in the store, 0 when it is empty."""
        result = conn.execute(_sa.select(_sa.func.max(self.message_table.c.global_position)))
        return cast(int, result.scalar() or 0)

    def get_max_version(self, conn: _sa.Connection, stream: str) -> MessagePosition:
        """The position of the last message of `stream`; `(stream, 0, None)` when empty."""
        c = self.message_table.c
        row = conn.execute(
            _sa.select(_sa.func.max(c.version), _sa.func.max(c.global_position)).where(
                c.stream == stream
            )
        ).one()
        # Both maxima are NULL exactly when the stream is empty.
        return MessagePosition(stream, row[0] or 0, row[1])

    def get_message_ids(self, conn: _sa.Connection, stream: str) -> Iterator[_uuid.UUID]:
        """Yield the message ids of `stream` in version order."""
        c = self.message_table.c
        yield from conn.execute(
            _sa.select(c.message_id).where(c.stream == stream).order_by(c.version)
        ).scalars()

    def read(
        self, conn: _sa.Connection, stream: str, min_version: int | None = None
    ) -> Iterator[StreamMessageRow]:
        """Rows `(message_id, version, message, global_position, added_at)` of `stream`
        in version order, from `min_version` on if given."""
        c = self.message_table.c
        query = self._select_without_stream.where(c.stream == stream)
        if min_version is not None:
            query = query.where(c.version >= min_version)
        return cast(Iterator[StreamMessageRow], conn.execute(query.order_by(c.version)))

    def read_multiple(self, conn: _sa.Connection, streams: Sequence[str]) -> Iterator[MessageRow]:
        """Rows `(message_id, stream, version, message, global_position, added_at)` of the
        given streams, in global position order."""
        c = self.message_table.c
        query = self._select.where(c.stream == _sa.any_(_array(list(streams), _sa.String())))
        return cast(Iterator[MessageRow], conn.execute(query.order_by(c.global_position)))

    def read_wildcard(self, conn: _sa.Connection, stream_wildcard: str) -> Iterator[MessageRow]:
        """Rows of every stream matching the LIKE pattern (`account-%`), in global position
        order."""
        c = self.message_table.c
        query = self._select.where(c.stream.like(stream_wildcard))
        return cast(Iterator[MessageRow], conn.execute(query.order_by(c.global_position)))

    def get_message_by_id(self, conn: _sa.Connection, message_id: _uuid.UUID) -> MessageRow | None:
        """The row of the message with id `message_id`, None when there is none."""
        query = self._select.where(self.message_table.c.message_id == as_uuid(message_id))
        return cast("MessageRow | None", conn.execute(query).first())

    def get_messages_by_ids(
        self, conn: _sa.Connection, message_ids: Sequence[_uuid.UUID]
    ) -> Iterator[MessageRow]:
        """Rows of the messages with the given ids (unknown ids are skipped), in global
        position order."""
        c = self.message_table.c
        ids = [as_uuid(i) for i in message_ids]
        query = self._select.where(c.message_id == _sa.any_(_array(ids, _sa.Uuid())))
        return cast(Iterator[MessageRow], conn.execute(query.order_by(c.global_position)))

    def truncate(self, conn: _sa.Connection) -> None:
        """Delete every message, in the caller's transaction (aggregated streams are not
        touched)."""
        conn.execute(self.message_table.delete())

    @staticmethod
    def message_table_name(name: str) -> str:
        """The message table of store `name`."""
        return _names.message_table(name)

    @staticmethod
    def meta_table_name(name: str) -> str:
        """depeche-db 0.14's per-stream table of store `name` (kept by our triggers when it
        exists; `AggregatedStream.get_migration_ddl_0_14_0` creates it)."""
        return _names.meta_table(name)

    @staticmethod
    def notification_channel_name(name: str) -> str:
        """The channel notified when messages are written to store `name`."""
        return _names.store_channel(name)

    @classmethod
    def get_migration_ddl(cls, name: str) -> str:
        """DDL bringing store `name` from depeche-db's layouts (<=0.8.0 to 0.13) to ours."""
        return migrations.store_migration_ddl(name)

    @classmethod
    def migrate_db_objects(cls, name: str, conn: _sa.Connection) -> None:
        """Apply `get_migration_ddl(name)` inside the caller's transaction."""
        execute_script(conn, cls.get_migration_ddl(name))


def check_write(stream: Any, expected_version: Any, messages: Any, caller: str) -> None:
    """What every write checks before encoding anything: the stream's name, an int (or no)
    expected version, a non-empty sequence of messages."""
    _names.validate_stream(stream)
    if expected_version is not None and (
        not isinstance(expected_version, int) or isinstance(expected_version, bool)
    ):
        raise TypeError(f"expected_version must be an int or None, got {expected_version!r}")
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"{caller} takes a sequence of messages")
    if not messages:
        raise ValueError(f"{caller} needs at least one message")


def as_uuid(value: Any) -> _uuid.UUID:
    """`value` as a UUID (a UUID or its text).

    Raises:
        TypeError: it is neither.
    """
    if isinstance(value, _uuid.UUID):
        return value
    try:
        return _uuid.UUID(str(value))
    except ValueError as exc:
        raise TypeError(f"message id {value!r} is not a UUID") from exc


def encode_message(message_id: _uuid.UUID, data: Any) -> str:
    """The JSON text of one message body, checked to be a JSON object jsonb can store.

    Raises:
        SerializationError: it is not a dict, not JSON, not UTF-8, or contains NUL.
    """
    if not isinstance(data, dict):
        raise SerializationError(
            f"message {message_id} is a {type(data).__name__}; it must be a dict (a JSON "
            "object): a serializer must return one"
        )
    try:
        body = _json.dumps(data, allow_nan=False, ensure_ascii=False)
        body.encode("utf-8")
    except (TypeError, ValueError) as exc:
        # UnicodeEncodeError (a ValueError) means a lone surrogate: not UTF-8.
        raise SerializationError(
            f"message {message_id} is not JSON that PostgreSQL can store: {exc}"
        ) from exc
    if _NUL_ESCAPE.search(body):
        raise SerializationError(
            f"message {message_id} contains a NUL character, which PostgreSQL's jsonb cannot store"
        )
    return body


def _encode_pairs(
    messages: Sequence[tuple[_uuid.UUID, dict[str, Any]]],
) -> tuple[list[_uuid.UUID], list[str]]:
    ids: list[_uuid.UUID] = []
    bodies: list[str] = []
    for item in messages:
        if not isinstance(item, tuple) or len(item) != 2:
            raise InvalidMessageError(
                f"each message must be a (message_id, message) pair, got {item!r:.80}"
            )
        message_id, data = item
        try:
            message_id = as_uuid(message_id)
        except TypeError as exc:
            raise InvalidMessageError(f"message id {message_id!r} is not a UUID") from exc
        ids.append(message_id)
        bodies.append(encode_message(message_id, data))
    return ids, bodies


def _message_times(
    times: Sequence[_dt.datetime | None] | None, count: int
) -> list[_dt.datetime | None]:
    if times is None:
        return [None] * count
    result = list(times)
    if len(result) != count:
        raise ValueError(f"message_times has {len(result)} items for {count} messages")
    for time in result:
        if time is None:
            continue
        if not isinstance(time, _dt.datetime):
            raise TypeError(f"a message time must be a datetime or None, got {time!r}")
        if time.utcoffset() is None:
            raise NaiveDatetimeError(f"message time {time} has no timezone; give an aware datetime")
    return result


def _array(values: list[Any], item_type: _sa.types.TypeEngine[Any]) -> Any:
    """One array parameter (`= ANY(...)`), whatever its length: an `IN` list would bind
    one parameter per value, and PostgreSQL takes at most 65535."""
    return _sa.bindparam(None, values, type_=_pg.ARRAY(item_type))


def _concurrency_error(
    exc: _sa.exc.DBAPIError, stream: str, expected_version: int | None
) -> OptimisticConcurrencyError | None:
    """The `OptimisticConcurrencyError` for the write function's version check, or None
    when `exc` is something else."""
    diag = getattr(exc.orig, "diag", None)
    if getattr(exc.orig, "sqlstate", None) != OCC_SQLSTATE or diag is None:
        return None
    if not (diag.message_primary or "").startswith("Wrong expected version"):
        return None
    actual = int(diag.message_detail) if diag.message_detail else None
    return OptimisticConcurrencyError(
        f"optimistic concurrency failure: stream {stream!r} is at version "
        f"{actual}, expected {expected_version}; re-read the stream and retry",
        stream=stream,
        expected_version=expected_version,
        actual_version=actual,
    )
