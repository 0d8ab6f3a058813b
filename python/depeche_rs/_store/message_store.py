"""The message store: streams of messages with optimistic concurrency."""

from __future__ import annotations

import contextlib as _contextlib
import datetime as _dt
import uuid as _uuid
import weakref as _weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import sqlalchemy as _sa

from .. import _names
from .._db.connection import ConnectionOwners as _ConnectionOwners
from .._db.connection import connect as _connect
from .._db.connection import libpq_dsn as _libpq_dsn
from .._db.connection import owners_of as _owners_of
from .._db.connection import to_engine as _to_engine
from .._exceptions import (
    InvalidMessageError,
    MessageIdMismatchError,
    MessageNotFound,
    SerializationError,
)
from .._interfaces import (
    MessagePosition,
    MessageProtocol,
    MessageSerializer,
    StoredMessage,
    stored_message,
)
from .._projection.aggregated_stream import AggregatedStreamFactory
from .storage import Storage, as_uuid, check_write

E = TypeVar("E", bound=MessageProtocol)
T = TypeVar("T")

_COLUMNS = "message_id, stream, version, message, global_position, added_at"


class MessageStoreReader(Generic[E]):
    """Reads messages over one connection (see `MessageStore.reader`)."""

    def __init__(
        self, conn: _sa.Connection, storage: Any, serializer: MessageSerializer[E]
    ) -> None:
        # `storage` is a store name, or anything with a `name` (depeche-db passes Storage).
        name = storage if isinstance(storage, str) else storage.name
        self._conn = conn
        self._table = _names.message_table(name)
        self._serializer = serializer

    def _stored(self, row: Any) -> StoredMessage[E]:
        return stored_message(row, self._serializer.deserialize(row.message))

    def _select(self, where: str, params: tuple[Any, ...]) -> Any:
        return self._conn.exec_driver_sql(
            f"SELECT {_COLUMNS} FROM {self._table} WHERE {where}", params
        )

    def get_message_by_id(self, message_id: _uuid.UUID) -> StoredMessage[E]:
        """Return the message with id `message_id`.

        Raises:
            MessageNotFound: no such message.
        """
        row = self._select("message_id = %s", (as_uuid(message_id),)).first()
        if row is None:
            raise MessageNotFound(message_id)
        return self._stored(row)

    def get_messages_by_ids(self, message_ids: Sequence[_uuid.UUID]) -> Iterator[StoredMessage[E]]:
        """Yield the messages with the given ids, in the order given; unknown ids are skipped."""
        ids = [as_uuid(i) for i in message_ids]
        if not ids:
            return
        rows = self._select("message_id = ANY(%s)", (ids,)).fetchall()
        by_id = {row[0]: row for row in rows}
        for message_id in ids:
            row = by_id.get(message_id)
            if row is not None:
                yield self._stored(row)

    def read(self, stream: str, min_version: int | None = None) -> Iterator[StoredMessage[E]]:
        """Yield the messages of `stream` in version order, from `min_version` on if given."""
        where = "stream = %s"
        params: tuple[Any, ...] = (stream,)
        if min_version is not None:
            where += " AND version >= %s"
            params += (min_version,)
        yield from map(self._stored, self._select(where + " ORDER BY version", params))

    def read_wildcard(self, stream_wildcard: str) -> Iterator[StoredMessage[E]]:
        """Yield the messages of every stream matching the LIKE pattern, in global order.

        `stream-%` matches streams starting with `stream-`, `%` matches all streams.
        """
        rows = self._select("stream LIKE %s ORDER BY global_position", (stream_wildcard,))
        yield from map(self._stored, rows)


class MessageStore(Generic[E]):
    """A message store: named streams of messages in PostgreSQL.

    Args:
        name: A valid identifier, used as prefix of the database objects.
        engine: A SQLAlchemy Engine (psycopg 3 driver) or a DSN string.
        serializer: Turns messages into JSON objects and back.

    Attributes:
        aggregated_stream (AggregatedStreamFactory): creates aggregated streams.
        engine: The SQLAlchemy Engine in use.
        name: The store name.

    `close()` (or leaving a `with store:` block) closes every connection the store, its
    aggregated streams, projectors and subscriptions opened; so does `engine.dispose()`
    on the Engine given.
    """

    def __init__(self, name: str, engine: Any, serializer: MessageSerializer[E]) -> None:
        self.name = _names.validate_name(name, "store name")
        self.engine: _sa.Engine = _to_engine(engine)
        self._owns_engine = self.engine is not engine
        if self._owns_engine:
            # We made this engine, so we close its pooled connections with the store.
            _weakref.finalize(self, self.engine.dispose)
        # Connections opened outside the engine's pool (the Rust projector's, subscription
        # readers', locks', listeners'): closed by close() and by engine.dispose().
        self._connection_owners = _ConnectionOwners()
        _owners_of(self.engine).add(self._connection_owners.close_all)
        self._serializer = serializer
        # depeche-db's row layer; every write goes through its `add_all` (creating it
        # creates or upgrades the store's database objects).
        self._storage = Storage(name, self.engine)
        self.aggregated_stream: AggregatedStreamFactory[E] = AggregatedStreamFactory(store=self)

    @property
    def dsn(self) -> str:
        """The libpq DSN of the engine (with password), as used by the Rust engine."""
        return _libpq_dsn(self.engine)

    @property
    def notification_channel(self) -> str:
        """The channel notified (once per stream per statement) when messages are written."""
        return _names.store_channel(self.name)

    def close(self) -> None:
        """Close every connection opened by the store and its aggregated streams,
        projectors and subscriptions (each reopens one if used again); a store made from
        a DSN also disposes of its engine."""
        self._connection_owners.close_all()
        if self._owns_engine:
            self.engine.dispose()

    def __enter__(self) -> MessageStore[E]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def truncate(self) -> None:
        """Delete all messages of the store (aggregated streams are not touched)."""
        with _connect(self.engine) as conn:
            self._storage.truncate(conn)
            conn.commit()

    def write(
        self,
        stream: str,
        message: E,
        expected_version: int | None = None,
        conn: _sa.Connection | None = None,
    ) -> MessagePosition:
        """Write a message to `stream`.

        With `expected_version`, the write fails with `OptimisticConcurrencyError` unless
        the stream is at that version (0 for a new stream). With `conn`, the write joins
        the caller's transaction and **the caller commits**.

        Returns:
            The position of the message.
        """
        return self.write_many(stream, [message], expected_version=expected_version, conn=conn)

    def write_many(
        self,
        stream: str,
        messages: Sequence[E],
        expected_version: int | None = None,
        conn: _sa.Connection | None = None,
    ) -> MessagePosition:
        """Append several messages to one stream in one round trip, atomically.

        `expected_version` applies to the stream before the first message. Returns the
        position of the last message.
        """
        check_write(stream, expected_version, messages, "write_many")
        pairs, times = self._encode(messages)
        return self._in_transaction(
            conn,
            lambda c: self._storage.add_all(
                c, stream, expected_version, pairs, message_times=times
            ),
        )

    def _in_transaction(
        self, conn: _sa.Connection | None, work: Callable[[_sa.Connection], T]
    ) -> T:
        """Run `work` on the caller's connection (the caller commits), or on a connection
        of our own, committed when `work` returns."""
        if conn is not None:
            return work(conn)
        with _connect(self.engine) as own:
            result = work(own)
            own.commit()
            return result

    def _encode(
        self, messages: Sequence[E]
    ) -> tuple[list[tuple[_uuid.UUID, dict[str, Any]]], list[_dt.datetime | None]]:
        """Each message's `(id, serialized body)` and time; `Storage.add_all` checks that
        the bodies are JSON objects PostgreSQL can store."""
        pairs: list[tuple[_uuid.UUID, dict[str, Any]]] = []
        times: list[_dt.datetime | None] = []
        for message in messages:
            try:
                message_id = message.get_message_id()
            except AttributeError as exc:
                raise InvalidMessageError(
                    f"{type(message).__name__} is not a message: it needs get_message_id() "
                    "(see depeche_rs.MessageProtocol)"
                ) from exc
            if not isinstance(message_id, _uuid.UUID):
                raise InvalidMessageError(
                    f"get_message_id() of {type(message).__name__} returned "
                    f"{type(message_id).__name__}, expected uuid.UUID"
                )
            try:
                data = self._serializer.serialize(message)
            except Exception as exc:
                raise SerializationError(
                    f"the serializer failed on message {message_id} ({type(message).__name__}): "
                    f"{exc}"
                ) from exc
            pairs.append((message_id, data))
            times.append(_message_time(message))
        return pairs, times

    def synchronize(
        self,
        stream: str,
        expected_version: int,
        messages: Sequence[E],
        conn: _sa.Connection | None = None,
    ) -> MessagePosition:
        """Make `stream` hold `messages`: append the ones not stored yet.

        The stored prefix must have the same message ids as `messages`, else
        `MessageIdMismatchError`; `expected_version` guards the append. With `conn`, the
        caller commits.
        """
        return self._in_transaction(
            conn, lambda c: self._synchronize(c, stream, expected_version, messages)
        )

    def _synchronize(
        self,
        conn: _sa.Connection,
        stream: str,
        expected_version: int,
        messages: Sequence[E],
    ) -> MessagePosition:
        stored = list(self._storage.get_message_ids(conn, stream))
        given = [m.get_message_id() for m in messages]
        for index, (stored_id, given_id) in enumerate(zip(stored, given, strict=False)):
            if stored_id != given_id:
                raise MessageIdMismatchError(
                    f"message id mismatch in stream {stream!r} at version {index + 1}: stored "
                    f"{stored_id}, given {given_id}; has the stream been modified meanwhile?"
                )
        new = messages[len(stored) :]
        if new:
            return self.write_many(stream, new, expected_version=expected_version, conn=conn)
        return self._storage.get_max_version(conn, stream)

    @_contextlib.contextmanager
    def reader(self, conn: _sa.Connection | None = None) -> Iterator[MessageStoreReader[E]]:
        """A reader over `conn`, or over a new connection closed when the block ends.

        with store.reader() as reader:
            message = reader.get_message_by_id(some_id)
        """
        with _contextlib.nullcontext(conn) if conn is not None else _connect(self.engine) as c:
            yield MessageStoreReader(c, self.name, self._serializer)

    def read(self, stream: str, min_version: int | None = None) -> Iterator[StoredMessage[E]]:
        """Yield the messages of `stream` in version order, from `min_version` on if given."""
        with self.reader() as reader:
            yield from reader.read(stream, min_version)


def _message_time(message: Any) -> _dt.datetime | None:
    """The message's time as an aware datetime, or None when it has none to give.

    Recording it at write time saves the projector a deserialisation, but depeche-db
    only asks for it while projecting: a write must not fail on it. None leaves
    `occurred_at` NULL and the projector asks the message again (and reports it then).
    """
    try:
        occurred_at = message.get_message_time()
        if not isinstance(occurred_at, _dt.datetime):
            return None
        if occurred_at.utcoffset() is None:
            # Naive message times are taken as UTC, as depeche-db's projector stores them.
            return occurred_at.replace(tzinfo=_dt.timezone.utc)
        return occurred_at.astimezone(_dt.timezone.utc)
    except Exception:
        return None
