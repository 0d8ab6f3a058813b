"""The factories reachable as `store.aggregated_stream` and `stream.subscription`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

from ._interfaces import (
    CallMiddleware,
    LockProvider,
    MessageHandlerRegisterProtocol,
    MessagePartitioner,
    MessageProtocol,
    SubscriptionErrorHandler,
    SubscriptionStartPoint,
    SubscriptionStateProvider,
)

if TYPE_CHECKING:
    from ._aggregated_stream import AggregatedStream
    from ._message_store import MessageStore
    from ._subscription import AckStrategy, Subscription

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
    """Creates subscriptions on an aggregated stream:

    subscription = stream.subscription(
        name="subscription_name",
        handlers=...,
        call_middleware=...,
        error_handler=...,
        state_provider=...,
        lock_provider=...,
    )
    """

    def __init__(self, stream: AggregatedStream[E]) -> None:
        self._stream = stream

    def __call__(
        self,
        name: str,
        handlers: MessageHandlerRegisterProtocol[E] | None = None,
        batch_size: int | None = None,
        call_middleware: CallMiddleware[E] | None = None,
        error_handler: SubscriptionErrorHandler[E] | None = None,
        state_provider: SubscriptionStateProvider | None = None,
        lock_provider: LockProvider | None = None,
        start_point: SubscriptionStartPoint | None = None,
        ack_strategy: AckStrategy | None = None,
    ) -> Subscription[E]:
        """Create a subscription.

        Args:
            name: The name of the subscription, a valid Python identifier
            handlers: Handlers called for the messages; defaults to an empty register
            batch_size: Messages read at once (default 10), see `SubscriptionRunner`
            call_middleware: Wraps the handler calls
            error_handler: Decides what a handler error does; defaults to exiting
            state_provider: Where positions are stored; defaults to PostgreSQL
            lock_provider: Partition locks; defaults to PostgreSQL advisory locks
            start_point: Where a new subscription starts; defaults to the beginning
            ack_strategy: `AckStrategy.SINGLE` (default) or `AckStrategy.BATCHED`

        Raises:
            InvalidNameError: `name` is not an identifier.
            InvalidHandlerError: a handler needs a call_middleware that is not given.
        """
        from ._message_handler import MessageHandlerRegister, SubscriptionMessageHandler
        from ._subscription import AckStrategy, Subscription

        register: MessageHandlerRegisterProtocol[E] = (
            handlers if handlers is not None else MessageHandlerRegister()
        )
        return Subscription(
            name=name,
            stream=self._stream,
            message_handler=SubscriptionMessageHandler(
                handler_register=register,
                error_handler=error_handler,
                call_middleware=call_middleware,
            ),
            batch_size=batch_size,
            state_provider=state_provider,
            lock_provider=lock_provider,
            start_point=start_point,
            ack_strategy=ack_strategy or AckStrategy.SINGLE,
        )
