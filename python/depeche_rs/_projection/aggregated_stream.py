"""Aggregated streams: origin streams merged by LIKE wildcards and split into partitions."""

from __future__ import annotations

import contextlib as _contextlib
import datetime as _dt
from collections.abc import Iterator
from typing import Any, Generic, NamedTuple, TypeVar

import sqlalchemy as _sa

from .. import _names
from .._db import migrations, schema
from .._db.connection import connect as _connect
from .._db.connection import execute_script
from .._exceptions import NaiveDatetimeError
from .._interfaces import (
    AggregatedStreamMessage,
    MessagePartitioner,
    MessageProtocol,
    MessageStoreView,
    StreamPartitionStatistic,
    SubscriptionStartPoint,
)
from .._subscriptions.factory import SubscriptionFactory
from .projector import FullUpdateResult as FullUpdateResult  # depeche-db exports it from here
from .projector import StreamProjector
from .stream_reader import AggregatedStreamReader, AsyncAggregatedStreamReader

E = TypeVar("E", bound=MessageProtocol)


class SelectedOriginStream(NamedTuple):
    """An origin stream with the global position to project it from.

    Only so that code importing it from depeche-db's `_aggregated_stream` still imports:
    depeche-db's projector selects such streams (`_select_origin_streams`); ours
    follows a cursor instead and never produces them.
    """

    stream: str
    start_at_global_position: int


class AggregatedStream(Generic[E]):
    """Aggregates the origin streams matching `stream_wildcards` into one partitioned stream.

    The `update_batch_size` argument sets how many messages the projector writes per
    transaction; larger batches mean fewer round trips and more memory. It defaults to
    1000 (depeche-db: 100); any positive value gives the same result.

    Args:
        name: Stream name, a valid Python identifier.
        store: The message store.
        partitioner: Gives the partition of each message.
        stream_wildcards: LIKE patterns of the origin streams, e.g. `["account-%"]`.
        update_batch_size: Messages per projector batch.
        lookback_for_gaps_hours: Accepted for depeche-db compatibility and ignored: the
            projector never skips a late commit, however late (see docs/projector.md).

    Attributes:
        name (str): Stream name
        projector (StreamProjector): Stream projector
        subscription (SubscriptionFactory): Creates subscriptions on this stream
        notification_channel (str): Channel notified when the stream gets new messages
    """

    def __init__(
        self,
        name: str,
        store: MessageStoreView[E],
        partitioner: MessagePartitioner[E],
        stream_wildcards: list[str],
        update_batch_size: int | None = None,
        lookback_for_gaps_hours: int | None = None,
    ) -> None:
        self.name = _names.validate_name(name, "aggregated stream name")
        wildcards = _names.validate_wildcards(stream_wildcards)
        if not callable(getattr(partitioner, "get_partition", None)):
            raise TypeError(
                f"partitioner {partitioner!r} has no get_partition(message) method "
                "(see depeche_rs.MessagePartitioner)"
            )
        self._store = store
        self._table = _names.stream_table(name)
        self._maxpos_table = _names.maxpos_table(name)
        self.notification_channel = _names.stream_channel(name)
        schema.ensure_stream(store.engine, name)
        self.subscription: SubscriptionFactory[E] = SubscriptionFactory(self)
        self.projector: StreamProjector[E] = StreamProjector(
            stream=self,
            partitioner=partitioner,
            stream_wildcards=wildcards,
            batch_size=update_batch_size,
            lookback_for_gaps_hours=lookback_for_gaps_hours,
        )

    def reader(
        self, start_point: SubscriptionStartPoint | None = None
    ) -> AggregatedStreamReader[E]:
        """A stateless reader following this stream from `start_point` on."""
        return AggregatedStreamReader(self, start_point=start_point)

    def async_reader(
        self, start_point: SubscriptionStartPoint | None = None
    ) -> AsyncAggregatedStreamReader[E]:
        """The asyncio version of `reader`."""
        return AsyncAggregatedStreamReader(self, start_point=start_point)

    @property
    def store(self) -> MessageStoreView[E]:
        """The message store this stream aggregates."""
        return self._store

    def _connection(
        self, conn: _sa.Connection | None = None
    ) -> _contextlib.AbstractContextManager[_sa.Connection]:
        return _contextlib.nullcontext(conn) if conn is not None else _connect(self._store.engine)

    def truncate(self, conn: _sa.Connection) -> None:
        """Delete every message of the aggregated stream, inside the caller's transaction.

        Positions and the projector's progress are reset too, so the next projector run
        projects the origin streams again from the start.
        """
        conn.exec_driver_sql(f"LOCK TABLE {self._table} IN EXCLUSIVE MODE")
        conn.exec_driver_sql(f"DELETE FROM {self._table}")
        conn.exec_driver_sql(f"DELETE FROM {self._maxpos_table}")
        conn.exec_driver_sql(f"DELETE FROM {_names.cursor_table(self.name)}")

    def read(
        self, partition: int, conn: _sa.Connection | None = None
    ) -> Iterator[AggregatedStreamMessage]:
        """Yield all messages of a partition in position order.

        Args:
            partition: Partition number
            conn: Connection to read with; a new one is used when not given.
        """
        return self.read_slice(partition, 0, None, conn)

    def read_slice(
        self, partition: int, start: int, count: int | None, conn: _sa.Connection | None = None
    ) -> Iterator[AggregatedStreamMessage]:
        """Yield up to `count` messages of a partition from position `start` on.

        Args:
            partition: Partition number
            start: Start position
            count: Number of messages to read (None: all)
            conn: Connection to read with; a new one is used when not given.
        """
        with self._connection(conn) as c:
            for message_id, position in c.exec_driver_sql(
                f"SELECT message_id, position FROM {self._table} "
                "WHERE partition = %s AND position >= %s ORDER BY position LIMIT %s",
                (partition, start, count),
            ):
                yield AggregatedStreamMessage(partition, position, message_id)

    def get_partition_statistics(
        self,
        position_limits: dict[int, int] | int | None = None,
        result_limit: int | None = None,
        conn: _sa.Connection | None = None,
    ) -> Iterator[StreamPartitionStatistic]:
        """Yield, per partition, its next message and its max position.

        Without `position_limits` the next message is the partition's first; with it
        (partition -> last position already read), the first message after that position,
        and partitions with nothing after it are left out. With `result_limit`, only the
        partitions whose next message is oldest are returned. (depeche-db 0.13 takes
        `result_limit` as the first argument; an int given first is read that way.)
        """
        if isinstance(position_limits, int) and not isinstance(position_limits, bool):
            position_limits, result_limit = None, position_limits
        limits: dict[int, int] = position_limits if isinstance(position_limits, dict) else {}
        query = (
            "SELECT p.partition, n.message_id, n.position, n.message_occurred_at, p.max_position "
            f"FROM {self._maxpos_table} AS p "
            "LEFT JOIN unnest(%s::int8[], %s::int8[]) AS l(partition, position) "
            "  ON l.partition = p.partition "
            "CROSS JOIN LATERAL ("
            "  SELECT a.message_id, a.position, a.message_occurred_at "
            f"  FROM {self._table} AS a "
            "  WHERE a.partition = p.partition AND a.position > coalesce(l.position, -1) "
            "  ORDER BY a.position LIMIT 1) AS n "
            "WHERE p.max_position > coalesce(l.position, -1)"
        )
        params: tuple[Any, ...] = (list(limits), list(limits.values()))
        if result_limit is not None:
            query += " ORDER BY n.message_occurred_at, p.partition LIMIT %s"
            params += (result_limit,)
        else:
            query += " ORDER BY p.partition"
        with self._connection(conn) as c:
            rows = c.exec_driver_sql(query, params).fetchall()
        for row in rows:
            yield StreamPartitionStatistic(*row)

    def get_max_aggregated_stream_positions(
        self, conn: _sa.Connection | None = None
    ) -> dict[int, int]:
        """Return partition -> highest position."""
        query = f"SELECT partition, max_position FROM {self._maxpos_table}"
        with self._connection(conn) as c:
            return dict(c.exec_driver_sql(query).tuples().all())

    def time_to_positions(self, time: _dt.datetime) -> dict[int, int]:
        """Return, per partition, the first position whose message time is at or after `time`.

        Partitions with nothing that late map to their max position + 1.

        Args:
            time: A timezone-aware datetime.
        """
        if not isinstance(time, _dt.datetime):
            raise TypeError(f"time must be a datetime, got {type(time).__name__}")
        if time.tzinfo is None or time.utcoffset() is None:
            raise NaiveDatetimeError("time must be timezone aware, e.g. datetime.now(timezone.utc)")
        utc = time.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        return self._per_partition("min", "a.message_occurred_at >= %s", "p.max_position + 1", utc)

    def global_position_to_positions(self, global_position: int) -> dict[int, int]:
        """Return, per partition, the highest position of a message at or before
        `global_position` in the store (-1 when there is none).

        Args:
            global_position: Global position
        """
        condition = "a.origin_stream_global_position <= %s"
        return self._per_partition("max", condition, "-1", global_position)

    def _per_partition(
        self, aggregate: str, condition: str, default: str, param: Any
    ) -> dict[int, int]:
        """Per partition, `aggregate` of the positions whose rows meet `condition`, else
        `default`."""
        query = (
            f"SELECT p.partition, coalesce((SELECT {aggregate}(a.position) FROM {self._table} AS a "
            f"WHERE a.partition = p.partition AND {condition}), {default}) "
            f"FROM {self._maxpos_table} AS p"
        )
        with self._connection() as c:
            return dict(c.exec_driver_sql(query, (param,)).tuples().all())

    @staticmethod
    def stream_table_name(name: str) -> str:
        """The table of aggregated stream `name`."""
        return _names.stream_table(name)

    @staticmethod
    def notification_channel_name(name: str) -> str:
        """The notification channel of aggregated stream `name`."""
        return _names.stream_channel(name)

    @classmethod
    def get_migration_ddl(cls, name: str, message_store_name: str | None = None) -> str:
        """DDL bringing aggregated stream `name` from any depeche-db layout (<=0.8.0,
        0.8-0.10, 0.11-0.12.2, 0.13) to ours. Running it twice is a no-op.

        `message_store_name` is needed to fill the origin global positions of the
        0.8-0.10 layout; without it that step is left out.
        """
        return migrations.stream_migration_ddl(name, message_store_name)

    @classmethod
    def get_migration_ddl_0_8_0(cls, aggregated_stream_name: str, message_store_name: str) -> str:
        """DDL to migrate from < 0.8.0 (the full idempotent migration to our layout)."""
        return migrations.stream_migration_ddl(aggregated_stream_name, message_store_name)

    @classmethod
    def get_migration_ddl_0_11_0(cls, aggregated_stream_name: str, message_store_name: str) -> str:
        """DDL to migrate from < 0.11.0 (the full idempotent migration to our layout)."""
        return migrations.stream_migration_ddl(aggregated_stream_name, message_store_name)

    @classmethod
    def get_migration_ddl_0_14_0(cls, aggregated_stream_name: str, message_store_name: str) -> str:
        """DDL to migrate from < 0.14.0: the full idempotent migration to our layout, then
        depeche-db 0.14's tables (the store's `_meta`, the stream's `_omax`) created or
        repaired from the rows under locks that make them exact. Our triggers keep them
        from then on, so depeche-db 0.14 processes can share the tables."""
        return "\n".join(
            [
                migrations.store_migration_ddl(message_store_name),
                migrations.stream_migration_ddl(aggregated_stream_name, message_store_name),
                migrations.depeche_db_0_14_ddl(message_store_name, [aggregated_stream_name]),
            ]
        )

    @classmethod
    def migration_script_generators(cls) -> dict[tuple[int, int], list[Any]]:
        """depeche-db's per-version migration generators; each of ours does the whole job
        (the 0.14 one also creates depeche-db 0.14's tables)."""
        return {
            (0, 8): [cls.get_migration_ddl_0_8_0],
            (0, 11): [cls.get_migration_ddl_0_11_0],
            (0, 14): [cls.get_migration_ddl_0_14_0],
        }

    @classmethod
    def migrate_db_objects(
        cls, name: str, conn: _sa.Connection, message_store_name: str | None = None
    ) -> None:
        """Apply `get_migration_ddl(name)` inside the caller's transaction.

        Raises:
            ValueError: the stream has the 0.8-0.10 layout and `message_store_name` is
                missing (nothing is changed).
        """
        if message_store_name is None:
            lacks_columns = conn.exec_driver_sql(
                "SELECT to_regclass(%s) IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_attribute "
                "WHERE attrelid = to_regclass(%s) AND attname = 'origin_stream_global_position' "
                "AND NOT attisdropped)",
                (_names.stream_table(name), _names.stream_table(name)),
            ).scalar()
            if lacks_columns:
                raise ValueError(
                    f"aggregated stream {name} has the depeche-db 0.8-0.10 layout: pass "
                    "message_store_name so the origin global positions can be filled in"
                )
        execute_script(conn, cls.get_migration_ddl(name, message_store_name))


class AggregatedStreamFactory(Generic[E]):
    """Creates aggregated streams of a store:

    store = MessageStore(...)
    stream = store.aggregated_stream(
        name="stream_name",
        partitioner=...,
        stream_wildcards=["stream_%"]
    )
    """

    def __init__(self, store: MessageStoreView[E]) -> None:
        self._store = store

    def __call__(
        self,
        name: str,
        partitioner: MessagePartitioner[E],
        stream_wildcards: list[str],
        update_batch_size: int | None = None,
        lookback_for_gaps_hours: int | None = None,
    ) -> AggregatedStream[E]:
        """Create an aggregated stream.

        Args:
            name: The name of the stream, a valid Python identifier
            partitioner: A partitioner for the stream
            stream_wildcards: A list of stream wildcards (LIKE patterns)
            update_batch_size: The batch size for updating the stream
            lookback_for_gaps_hours: Ignored (accepted for depeche-db compatibility)
        """
        return AggregatedStream(
            name=name,
            store=self._store,
            partitioner=partitioner,
            stream_wildcards=stream_wildcards,
            update_batch_size=update_batch_size,
            lookback_for_gaps_hours=lookback_for_gaps_hours,
        )
