"""depeche-db's module path `tools.immem_subscription` (its spelling)."""

from ._inmem_subscription import InMemorySubscriptionState, NullLockProvider

__all__ = ["InMemorySubscriptionState", "NullLockProvider"]
