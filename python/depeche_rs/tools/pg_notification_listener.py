"""depeche-db's module path `tools.pg_notification_listener`."""

from ._pg_notification_listener import PgNotification, PgNotificationListener

__all__ = ["PgNotification", "PgNotificationListener"]
