"""The data types and protocols shared by the store, the aggregated streams and subscriptions.

Names, fields and semantics match depeche-db 0.13 so that `import depeche_rs as depeche_db`
keeps working.
"""

from __future__ import annotations

import contextlib as _contextlib
import dataclasses as _dc
import datetime as _dt
import enum as _enum
import functools as _ft
import time as _time
import uuid as _uuid
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    import sqlalchemy as _sa

    from ._db.connection import ConnectionOwners


@runtime_checkable
class MessageProtocol(Protocol):
    """What every message stored in a `MessageStore` must provide."""

    def get_message_id(self) -> _uuid.UUID:
        """Return the message's unique id (the primary key in the message table)."""

    def get_message_time(self) -> _dt.datetime:
        """Return when the message happened (timezone aware)."""


E = TypeVar("E", bound=MessageProtocol)
M = TypeVar("M")


@_dc.dataclass(frozen=True)
class StoredMessage(Generic[E]):
    """A message as stored in a stream.

    Attributes:
        message_id: Message ID
        stream: Stream name
        version: Message version within its stream (1-based)
        message: The deserialized message
        global_position: Position in the whole store
        added_at: Database timestamp when the message was added (UTC, naive)
    """

    message_id: _uuid.UUID
    stream: str
    version: int
    message: E
    global_position: int
    added_at: _dt.datetime


def stored_message(row: Any, message: E) -> StoredMessage[E]:
    """The one way a `StoredMessage` is made from a row of the message table: any object
    with its columns as attributes (a SQLAlchemy row, the engine's `StoredRow`) and the
    message deserialized from the row's body."""
    return StoredMessage(
        row.message_id, row.stream, row.version, message, row.global_position, row.added_at
    )


class AckOpProtocol(Protocol):
    """An acknowledgement operation handed to a handler with its message."""

    def execute(self, **kwargs: Any) -> Any:
        """Acknowledge the message (with `conn=` to do it in the caller's transaction)."""


@_dc.dataclass(frozen=True)
class SubscriptionMessage(Generic[E]):
    """A message received from a subscription.

    Attributes:
        partition: Partition number
        position: Position in the partition
        stored_message: The stored message
        ack: Acknowledgement operation
    """

    partition: int
    position: int
    stored_message: StoredMessage[E]
    ack: AckOpProtocol


@_dc.dataclass()
class SubscriptionMessageBatch(Generic[E]):
    """A batch of consecutive messages of one partition, acknowledged in order."""

    partition: int
    first_position: int
    last_position: int
    lock_key: str
    messages: list[SubscriptionMessage[E]]
    ackd_position: int = -1

    @_ft.cached_property
    def message_ids(self) -> set[_uuid.UUID]:
        """The ids of the messages in the batch."""
        return {message.stored_message.message_id for message in self.messages}

    def ack(self, message: SubscriptionMessage[E]) -> None:
        """Acknowledge `message`; messages must be acknowledged in position order."""
        if message.stored_message.message_id not in self.message_ids:
            raise ValueError("Message not found in the batch")
        if self.ackd_position != -1 and self.ackd_position + 1 != message.position:
            raise ValueError(
                f"cannot acknowledge position {message.position} after {self.ackd_position}: "
                "acknowledge messages in order, without gaps"
            )
        self.ackd_position = message.position


@_dc.dataclass(frozen=True)
class MessagePosition:
    """Where a message landed.

    Attributes:
        stream: Stream name
        version: Message version
        global_position: Global position
    """

    stream: str
    version: int
    global_position: int | None


@_dc.dataclass
class StreamPartitionStatistic:
    """The next message of a partition, as seen by subscriptions choosing where to read."""

    partition_number: int
    next_message_id: _uuid.UUID
    next_message_position: int
    next_message_occurred_at: _dt.datetime
    max_position: int


@_dc.dataclass
class AggregatedStreamMessage:
    """A pointer to a message in an aggregated stream.

    Attributes:
        partition: Partition number
        position: Position in the partition
        message_id: Message ID
    """

    partition: int
    position: int
    message_id: _uuid.UUID


@_dc.dataclass
class SubscriptionState:
    """Subscription state: partition number -> last acknowledged position."""

    positions: dict[int, int]


class MessageSerializer(Protocol, Generic[M]):
    """Turns messages into JSON-able dicts and back.

    For any serializer: `deserialize(serialize(m)) == m`, the type round-trips, and
    `serialize(deserialize(data)) == data`.
    """

    def serialize(self, message: M) -> dict[str, Any]:
        """Serialize a message to a JSON-serializable dict."""
        raise NotImplementedError()

    def deserialize(self, message: dict[str, Any]) -> M:
        """Deserialize a message from a dict."""
        raise NotImplementedError()


class MessagePartitioner(Protocol, Generic[E]):
    """Determines the partition number of a message."""

    def get_partition(self, message: StoredMessage[E]) -> int:
        """Return the partition (an int >= 0), deterministic for a given message."""
        raise NotImplementedError


class LockProvider(Protocol):
    """Non-blocking named locks."""

    def lock(self, name: str) -> bool:
        """Try to lock `name`; return True when locked. Must not block."""
        raise NotImplementedError

    def unlock(self, name: str) -> None:
        """Release the lock on `name`."""
        raise NotImplementedError


class SubscriptionStateProvider(Protocol):
    """Stores and reads subscription state."""

    def store(self, subscription_name: str, partition: int, position: int) -> None:
        """Store the last acknowledged position of a partition."""
        raise NotImplementedError

    def read(self, subscription_name: str) -> SubscriptionState:
        """Read the state of a subscription."""
        raise NotImplementedError

    def initialize(self, subscription_name: str) -> None:
        """Mark the subscription state as initialized."""
        raise NotImplementedError

    def initialized(self, subscription_name: str) -> bool:
        """Return True if the subscription state was initialized."""
        raise NotImplementedError

    def session(self, **kwargs: Any) -> SubscriptionStateProvider:
        """Return a provider bound to the caller's transaction (e.g. `conn=`)."""
        raise NotImplementedError


class CallMiddleware(Generic[E]):
    """Wraps the call of a handler, e.g. to inject dependencies."""

    def call(
        self,
        handler: Callable[..., Any],
        message: SubscriptionMessage[E] | StoredMessage[E] | E,
    ) -> None:
        """Call `handler` with `message` (typed as the handler's annotation asks)."""
        raise NotImplementedError


class TimeBudget(Protocol):
    """Tells long-running work when to stop."""

    def over_budget(self) -> bool:
        """Return True once the budget is used up."""
        raise NotImplementedError


class FixedTimeBudget:
    """A budget of `seconds` wall-clock seconds from construction."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start_time = _time.time()

    def over_budget(self) -> bool:
        """Return True once `seconds` have passed."""
        return _time.time() - self.start_time > self.seconds


class RunOnNotificationResult(_enum.Enum):
    """What a `RunOnNotification.run` call left behind."""

    WORK_REMAINING = "work_remaining"
    DONE_FOR_NOW = "done_for_now"


class RunOnNotification(Protocol):
    """Something an `Executor` runs when a notification arrives on its channel."""

    @property
    def notification_channel(self) -> str:
        """The channel to LISTEN on."""
        raise NotImplementedError

    def interested_in_notification(self, notification: dict[str, Any]) -> bool:
        """Return False to ignore a notification."""
        raise NotImplementedError

    def take_notification_hint(self, notification: dict[str, Any]) -> None:
        """Take a hint from a notification (fast and thread-safe)."""
        raise NotImplementedError

    def run(self, budget: TimeBudget) -> RunOnNotificationResult | None:
        """Do a chunk of work and return soon after the budget is over."""
        raise NotImplementedError

    def stop(self) -> None:
        """Ask a running `run` to return early (called from another thread)."""
        raise NotImplementedError


class ErrorAction(_enum.Enum):
    """What to do after a handler raised."""

    IGNORE = "ignore"
    EXIT = "exit"


class SubscriptionErrorHandler(Generic[E]):
    """Decides what happens when a handler raises."""

    def handle_error(self, error: Exception, message: SubscriptionMessage[E]) -> ErrorAction:
        """Return the action to take for `error` raised while handling `message`."""
        raise NotImplementedError


class SubscriptionStartPoint:
    """Where a new subscription starts reading."""

    def init_state(
        self,
        subscription_name: str,
        stream: AggregatedStreamView[Any],
        state_provider: SubscriptionStateProvider,
    ) -> None:
        """Initialize the subscription state if it is not initialized yet."""
        raise NotImplementedError


@_dc.dataclass
class HandlerDescriptor(Generic[E]):
    """A registered handler and what it wants to be called with."""

    handler: Callable[..., Any]
    pass_subscription_message: bool
    pass_stored_message: bool
    requires_middleware: bool

    def adapt_message_type(
        self, message: SubscriptionMessage[E] | StoredMessage[E] | E
    ) -> SubscriptionMessage[E] | StoredMessage[E] | E:
        """Unwrap `message` to what the handler's annotation asks for."""
        if isinstance(message, SubscriptionMessage):
            if self.pass_subscription_message:
                return message
            stored = message.stored_message
            return stored if self.pass_stored_message else stored.message
        if isinstance(message, StoredMessage):
            if self.pass_subscription_message:
                raise ValueError(
                    "SubscriptionMessage was requested, but StoredMessage was provided"
                )
            return message if self.pass_stored_message else message.message
        if self.pass_subscription_message or self.pass_stored_message:
            raise ValueError(
                "SubscriptionMessage or StoredMessage was requested, "
                "but a plain message was provided"
            )
        return message


class MessageHandlerRegisterProtocol(Protocol, Generic[E]):
    """How runners find handlers for messages."""

    def get_all_handlers(self) -> Iterator[HandlerDescriptor[E]]:
        """Return all registered handlers."""
        raise NotImplementedError

    def get_handler(self, message_type: type[E]) -> HandlerDescriptor[E] | None:
        """Return the handler for a message type, or None."""
        raise NotImplementedError


class MessageStoreReaderProtocol(Protocol[E]):
    """What `MessageStore.reader()` yields."""

    def get_message_by_id(self, message_id: _uuid.UUID) -> StoredMessage[E]:
        """Return the message with id `message_id` or raise `MessageNotFound`."""

    def get_messages_by_ids(self, message_ids: Sequence[_uuid.UUID]) -> Iterator[StoredMessage[E]]:
        """Return the messages with the given ids (missing ids are skipped)."""

    def read(self, stream: str, min_version: int | None = None) -> Iterator[StoredMessage[E]]:
        """Return the messages of `stream` in version order."""

    def read_wildcard(self, stream_wildcard: str) -> Iterator[StoredMessage[E]]:
        """Return the messages of all streams matching a LIKE pattern, in global order."""


class MessageStoreProtocol(Protocol[E]):
    """The public surface of `MessageStore`."""

    def truncate(self) -> None:
        """Delete all messages."""

    def write(
        self,
        stream: str,
        message: E,
        expected_version: int | None = None,
        conn: _sa.Connection | None = None,
    ) -> MessagePosition:
        """Write one message."""

    def synchronize(
        self,
        stream: str,
        expected_version: int,
        messages: Sequence[E],
        conn: _sa.Connection | None = None,
    ) -> MessagePosition:
        """Append the messages that are not yet in the stream."""

    def reader(
        self, conn: _sa.Connection | None = None
    ) -> _contextlib.AbstractContextManager[MessageStoreReaderProtocol[E]]:
        """A reader bound to a connection."""

    def read(self, stream: str, min_version: int | None = None) -> Iterator[StoredMessage[E]]:
        """Read a stream."""


class MessageStoreView(MessageStoreProtocol[E], Protocol[E]):
    """A `MessageStore` as its aggregated streams, projectors and subscriptions see it.

    The store creates them (`store.aggregated_stream`), so they name it by this protocol
    instead of importing its class: the imports run one way, from the store down.
    """

    name: str
    engine: _sa.Engine
    _serializer: MessageSerializer[E]
    _connection_owners: ConnectionOwners

    @property
    def dsn(self) -> str:
        """The libpq DSN of the engine, for the Rust engine and LISTEN."""

    @property
    def notification_channel(self) -> str:
        """The channel notified when messages are written."""


class AggregatedStreamView(Protocol[E]):
    """An `AggregatedStream` as its projector, readers, subscriptions and start points
    see it: the stream creates them, so they name it by this protocol (as `MessageStoreView`)."""

    name: str
    notification_channel: str

    @property
    def store(self) -> MessageStoreView[E]:
        """The message store the stream aggregates."""

    def get_max_aggregated_stream_positions(
        self, conn: _sa.Connection | None = None
    ) -> dict[int, int]:
        """Return partition -> highest position."""

    def time_to_positions(self, time: _dt.datetime) -> dict[int, int]:
        """Return, per partition, the first position at or after `time`."""
