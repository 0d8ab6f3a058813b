"""depeche-rs: a PostgreSQL message store for event-driven Python, with a Rust engine.

A drop-in for depeche-db 0.13: `import depeche_rs as depeche_db` keeps working.
"""

# depeche-db's module paths (and two older ones of ours), reachable as attributes after
# `import depeche_rs` as they were before they became re-exports.
from . import (  # noqa: F401
    _aggregated_stream,
    _aggregated_stream_reader,
    _connection,
    _executor,
    _factories,
    _message_handler,
    _message_store,
    _schema,
    _storage,
    _subscription,
)
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
    MessageStoreProtocol,
    MessageStoreReaderProtocol,
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
from ._native import __version__ as __version__
from ._projection.aggregated_stream import AggregatedStream, AggregatedStreamFactory
from ._projection.projector import FullUpdateResult, StreamProjector
from ._projection.stream_reader import AggregatedStreamReader, AsyncAggregatedStreamReader
from ._runtime.executor import Executor
from ._store.message_store import MessageStore, MessageStoreReader
from ._store.storage import Storage
from ._subscriptions.ack import AckOp, AckRolledback, AckStrategy, NoAckOp
from ._subscriptions.error_handlers import (
    ExitSubscriptionErrorHandler,
    LogAndIgnoreSubscriptionErrorHandler,
)
from ._subscriptions.factory import SubscriptionFactory
from ._subscriptions.message_handler import (
    DuplicateHandlerError,
    InvalidHandlerError,
    MessageHandler,
    MessageHandlerRegister,
    SubscriptionMessageHandler,
)
from ._subscriptions.start_points import StartAtNextMessage, StartAtPointInTime
from ._subscriptions.subscription import (
    BatchedAckSubscriptionRunner,
    Subscription,
    SubscriptionRunner,
)

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
