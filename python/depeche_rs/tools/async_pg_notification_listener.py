"""depeche-db's module path `tools.async_pg_notification_listener`."""

from ._async_pg_notification_listener import AsyncPgNotificationListener
from ._pg_notification_listener import PgNotification

__all__ = ["AsyncPgNotificationListener", "PgNotification"]
