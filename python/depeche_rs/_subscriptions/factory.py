"""The factory behind `stream.subscription(...)`."""

from __future__ import annotations

from typing import Generic, TypeVar

from .._interfaces import (
    AggregatedStreamView,
    CallMiddleware,
    LockProvider,
    MessageHandlerRegisterProtocol,
    MessageProtocol,
    SubscriptionErrorHandler,
    SubscriptionStartPoint,
    SubscriptionStateProvider,
)
from .ack import AckStrategy
from .message_handler import MessageHandlerRegister, SubscriptionMessageHandler
from .subscription import Subscription

E = TypeVar("E", bound=MessageProtocol)


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

    def __init__(self, stream: AggregatedStreamView[E]) -> None:
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
        return Subscription(
            name=name,
            stream=self._stream,
            message_handler=SubscriptionMessageHandler(
                handler_register=handlers if handlers is not None else MessageHandlerRegister(),
                error_handler=error_handler,
                call_middleware=call_middleware,
            ),
            batch_size=batch_size,
            state_provider=state_provider,
            lock_provider=lock_provider,
            start_point=start_point,
            ack_strategy=ack_strategy or AckStrategy.SINGLE,
        )
