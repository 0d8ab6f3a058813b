"""Readers that follow an aggregated stream from a start point, woken by notifications,
without stored state (depeche-db's `AggregatedStreamReader`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any, Generic, TypeVar

from .._interfaces import (
    AggregatedStreamView,
    MessageProtocol,
    StoredMessage,
    SubscriptionStartPoint,
)
from .._subscriptions.factory import SubscriptionFactory
from ..tools._inmem_subscription import InMemorySubscriptionState, NullLockProvider
from ..tools._pg_notification_listener import PgNotificationListener

E = TypeVar("E", bound=MessageProtocol)


def _exhaust(subscription: Any) -> list[StoredMessage[Any]]:
    out: list[StoredMessage[Any]] = []
    while batch := [m.stored_message for m in subscription.get_next_messages(count=100)]:
        out.extend(batch)
    return out


class AggregatedStreamReader(Generic[E]):
    """Reads an aggregated stream from `start_point` on, then follows it live.

    Call `start()` first; `get_messages()` yields what is there, then what arrives.
    """

    def __init__(
        self, stream: AggregatedStreamView[E], start_point: SubscriptionStartPoint | None = None
    ) -> None:
        self.stream = stream
        self.subscription = SubscriptionFactory(stream)(
            name=f"{stream.name}_reader",
            lock_provider=NullLockProvider(),
            state_provider=InMemorySubscriptionState(),
            start_point=start_point,
        )
        self.notification_listener = PgNotificationListener(
            dsn=stream.store.dsn, channels=[stream.notification_channel], select_timeout=0.5
        )
        stream.store._connection_owners.add(self.stop)

    def start(self) -> None:
        """Start listening for notifications (a connection on a thread)."""
        self.notification_listener.start()

    def get_messages(self, timeout: int = 0) -> Iterator[StoredMessage[E]]:
        """Yield the messages after the start point, then each new one as it arrives.

        Args:
            timeout: Stop after this many seconds without a notification (0: never).
        """
        yield from _exhaust(self.subscription)
        for _ in self.notification_listener.messages(timeout=timeout):
            yield from _exhaust(self.subscription)

    def stop(self) -> None:
        """Stop listening and close the connection."""
        self.notification_listener.stop()


class AsyncAggregatedStreamReader(Generic[E]):
    """The asyncio version of `AggregatedStreamReader` (database work runs in threads)."""

    def __init__(
        self, stream: AggregatedStreamView[E], start_point: SubscriptionStartPoint | None = None
    ) -> None:
        self._reader: AggregatedStreamReader[E] = AggregatedStreamReader(stream, start_point)
        self.stream = stream
        self.subscription = self._reader.subscription
        self.notification_listener = self._reader.notification_listener

    async def start(self) -> None:
        """Start listening for notifications."""
        await asyncio.to_thread(self._reader.start)

    async def get_messages(self, timeout: int = 0) -> AsyncIterator[StoredMessage[E]]:
        """Yield the messages after the start point, then each new one as it arrives."""
        for message in await asyncio.to_thread(_exhaust, self.subscription):
            yield message
        notifications = self.notification_listener.messages(timeout=timeout)
        sentinel = object()
        while await asyncio.to_thread(next, notifications, sentinel) is not sentinel:
            for message in await asyncio.to_thread(_exhaust, self.subscription):
                yield message

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        await asyncio.to_thread(self._reader.stop)
