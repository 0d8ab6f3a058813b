"""depeche-db's module path `tools.db_lock_provider`."""

from ._db_lock_provider import DbLockProvider

__all__ = ["DbLockProvider"]
