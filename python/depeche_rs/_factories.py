"""The factories reachable as `store.aggregated_stream` and `stream.subscription`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._interfaces import MessagePartitioner, MessageProtocol

if TYPE_CHECKING:
    from ._aggregated_stream import AggregatedStream
    from ._message_store import MessageStore

E = TypeVar("E", bound=MessageProtocol)


class AggregatedStreamFactory(Generic[E]):
    """Creates aggregated streams of a store:

        store = MessageStore(...)
        stream = store.aggregated_stream(
            name="stream_name",
            partitioner=...,
            stream_wildcards=["stream_%"]
        )
    """

    def __init__(self, store: MessageStore[E]) -> None:
        self._store = store

    def __call__(
        self,
        name: str,
        partitioner: MessagePartitioner[E],
        stream_wildcards: list[str],
        update_batch_size: int | None = None,
        lookback_for_gaps_hours: int | None = None,
    ) -> AggregatedStream[E]:
        """Create an aggregated stream.

        Args:
            name: The name of the stream, a valid Python identifier
            partitioner: A partitioner for the stream
            stream_wildcards: A list of stream wildcards (LIKE patterns)
            update_batch_size: The batch size for updating the stream
            lookback_for_gaps_hours: Ignored (accepted for depeche-db compatibility)
        """
        from ._aggregated_stream import AggregatedStream

        return AggregatedStream(
            name=name,
            store=self._store,
            partitioner=partitioner,
            stream_wildcards=stream_wildcards,
            update_batch_size=update_batch_size,
            lookback_for_gaps_hours=lookback_for_gaps_hours,
        )


class SubscriptionFactory(Generic[E]):
    """Creates subscriptions on an aggregated stream (`stream.subscription(...)`)."""

    def __init__(self, stream: AggregatedStream[E]) -> None:
        self._stream = stream

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Create a subscription; see `Subscription` for the arguments."""
        from ._subscription import create_subscription

        return create_subscription(self._stream, name, *args, **kwargs)
