"""depeche-db's module path `tools.db_subscription_state_provider`."""

from .._interfaces import SubscriptionState, SubscriptionStateProvider
from ._db_subscription_state_provider import DbSubscriptionStateProvider

__all__ = ["DbSubscriptionStateProvider", "SubscriptionState", "SubscriptionStateProvider"]
