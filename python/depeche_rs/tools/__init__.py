"""Ready-made parts: serializer, partitioners, lock and state providers, the listener."""

from ._async_pg_notification_listener import AsyncPgNotificationListener
from ._db_lock_provider import DbLockProvider
from ._db_subscription_state_provider import DbSubscriptionStateProvider
from ._partitioners import StreamHashPartitioner, StreamNamePartitioner
from ._pg_notification_listener import PgNotification, PgNotificationListener
from ._pydantic_serializer import PydanticMessageSerializer

__all__ = [
    "AsyncPgNotificationListener",
    "DbLockProvider",
    "DbSubscriptionStateProvider",
    "PgNotification",
    "PgNotificationListener",
    "PydanticMessageSerializer",
    "StreamHashPartitioner",
    "StreamNamePartitioner",
]
