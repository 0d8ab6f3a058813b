"""depeche-rs: a PostgreSQL message store for event-driven Python, with a Rust engine.

A drop-in for depeche-db 0.13: `import depeche_rs as depeche_db` keeps working.
"""

from ._ack import AckOp, AckRolledback, AckStrategy, NoAckOp
from ._aggregated_stream import AggregatedStream
from ._aggregated_stream_reader import AggregatedStreamReader, AsyncAggregatedStreamReader
from ._error_handlers import ExitSubscriptionErrorHandler, LogAndIgnoreSubscriptionErrorHandler
from ._exceptions import (
    DatabaseConnectionError,
    DatabaseError,
    DepecheError,
    EmbeddedPostgresError,
    InvalidMessageError,
    InvalidNameError,
    InvalidWildcardError,
    MessageIdMismatchError,
    MessageNotFound,
    MissingTablesError,
    NaiveDatetimeError,
    OptimisticConcurrencyError,
    PartitionerError,
    PoisonMessageError,
    SerializationError,
    UnsafeSequenceError,
)
from ._executor import Executor
from ._factories import AggregatedStreamFactory, SubscriptionFactory
from ._interfaces import (
    AggregatedStreamMessage,
    CallMiddleware,
    ErrorAction,
    FixedTimeBudget,
    HandlerDescriptor,
    LockProvider,
    MessageHandlerRegisterProtocol,
    MessagePartitioner,
    MessagePosition,
    MessageProtocol,
    MessageSerializer,
    RunOnNotification,
    RunOnNotificationResult,
    StoredMessage,
    StreamPartitionStatistic,
    SubscriptionErrorHandler,
    SubscriptionMessage,
    SubscriptionMessageBatch,
    SubscriptionStartPoint,
    SubscriptionState,
    SubscriptionStateProvider,
    TimeBudget,
)
from ._message_handler import (
    DuplicateHandlerError,
    InvalidHandlerError,
    MessageHandler,
    MessageHandlerRegister,
    SubscriptionMessageHandler,
)
from ._message_store import (
    MessageStore,
    MessageStoreProtocol,
    MessageStoreReader,
    MessageStoreReaderProtocol,
)
from ._native import __version__ as __version__
from ._projector import FullUpdateResult, StreamProjector
from ._start_points import StartAtNextMessage, StartAtPointInTime
from ._storage import Storage
from ._subscription import Subscription
from ._subscription_runner import BatchedAckSubscriptionRunner, SubscriptionRunner

__all__ = [
    "AckOp",
    "AckRolledback",
    "AckStrategy",
    "AggregatedStream",
    "AggregatedStreamFactory",
    "AggregatedStreamMessage",
    "AggregatedStreamReader",
    "AsyncAggregatedStreamReader",
    "BatchedAckSubscriptionRunner",
    "CallMiddleware",
    "DatabaseConnectionError",
    "DatabaseError",
    "DepecheError",
    "DuplicateHandlerError",
    "EmbeddedPostgresError",
    "ErrorAction",
    "Executor",
    "ExitSubscriptionErrorHandler",
    "FixedTimeBudget",
    "FullUpdateResult",
    "HandlerDescriptor",
    "InvalidHandlerError",
    "InvalidMessageError",
    "InvalidNameError",
    "InvalidWildcardError",
    "LockProvider",
    "LogAndIgnoreSubscriptionErrorHandler",
    "MessageHandler",
    "MessageHandlerRegister",
    "MessageHandlerRegisterProtocol",
    "MessageIdMismatchError",
    "MessageNotFound",
    "MessagePartitioner",
    "MessagePosition",
    "MessageProtocol",
    "MessageSerializer",
    "MessageStore",
    "MessageStoreProtocol",
    "MessageStoreReader",
    "MessageStoreReaderProtocol",
    "MissingTablesError",
    "NaiveDatetimeError",
    "NoAckOp",
    "OptimisticConcurrencyError",
    "PartitionerError",
    "PoisonMessageError",
    "RunOnNotification",
    "RunOnNotificationResult",
    "SerializationError",
    "StartAtNextMessage",
    "StartAtPointInTime",
    "Storage",
    "StoredMessage",
    "StreamPartitionStatistic",
    "StreamProjector",
    "Subscription",
    "SubscriptionErrorHandler",
    "SubscriptionFactory",
    "SubscriptionMessage",
    "SubscriptionMessageBatch",
    "SubscriptionMessageHandler",
    "SubscriptionRunner",
    "SubscriptionStartPoint",
    "SubscriptionState",
    "SubscriptionStateProvider",
    "TimeBudget",
    "UnsafeSequenceError",
]
