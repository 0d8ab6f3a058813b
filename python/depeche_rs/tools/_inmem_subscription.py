"""In-process subscription state and a lock provider that never blocks: for readers that
live and die with one process (depeche-db's `tools.immem_subscription`)."""

from __future__ import annotations

import threading
from typing import Any

from .._interfaces import SubscriptionState


class InMemorySubscriptionState:
    """Subscription state kept in a dict; lost when the process ends."""

    def __init__(self) -> None:
        self._state: dict[str, dict[int, int]] = {}
        self._guard = threading.Lock()

    def store(self, subscription_name: str, partition: int, position: int) -> None:
        """Remember the last acknowledged position of a partition."""
        with self._guard:
            self._state.setdefault(subscription_name, {})[partition] = position

    def read(self, subscription_name: str) -> SubscriptionState:
        """The positions of a subscription (a copy)."""
        with self._guard:
            return SubscriptionState(dict(self._state.get(subscription_name, {})))

    def initialize(self, subscription_name: str) -> None:
        """Mark the subscription as initialized."""
        with self._guard:
            self._state.setdefault(subscription_name, {})

    def initialized(self, subscription_name: str) -> bool:
        """Whether the subscription was initialized."""
        with self._guard:
            return subscription_name in self._state

    def session(self, **kwargs: Any) -> InMemorySubscriptionState:
        """Itself: there is no transaction to join."""
        return self


class NullLockProvider:
    """Grants every lock: for a single reader that competes with nobody."""

    def lock(self, name: str) -> bool:
        """Always True."""
        return True

    def unlock(self, name: str) -> None:
        """Nothing to release."""
