"""Runners: the loop that reads a subscription's batches and calls the handlers.

A runner is what an `Executor` runs on notifications (`RunOnNotification`).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._ack import _NO_ACK, AckOp
from ._interfaces import (
    MessageProtocol,
    RunOnNotificationResult,
    SubscriptionMessage,
    TimeBudget,
)
from ._message_handler import SubscriptionMessageHandler
from ._subscription import DEFAULT_BATCH_SIZE

if TYPE_CHECKING:
    from ._subscription import Subscription
    from ._subscription_reader import Claim

E = TypeVar("E", bound=MessageProtocol)


class SubscriptionRunner(Generic[E]):
    """Handles a subscription's messages, acknowledging each one after its handler
    (`AckStrategy.SINGLE`).

    `batch_size` (default 10) is how many messages of one partition are read and locked
    at once. Larger batches mean fewer round trips; messages of different partitions
    may then be handled further out of their global order. Within a partition the order
    is always kept.

    Implements `RunOnNotification`.

    Args:
        subscription: The subscription to read.
        message_handler: Calls the handlers.
        batch_size: Messages per batch.
    """

    def __init__(
        self,
        subscription: Subscription[E],
        message_handler: SubscriptionMessageHandler[E],
        batch_size: int | None = None,
    ) -> None:
        self._subscription = subscription
        self._batch_size = batch_size or DEFAULT_BATCH_SIZE
        self._keep_running = True
        self._handler = message_handler

    @property
    def notification_channel(self) -> str:
        """The aggregated stream's channel."""
        return self._subscription.stream.notification_channel

    def interested_in_notification(self, notification: dict[str, Any]) -> bool:
        """Every notification of the stream may concern this subscription."""
        return True

    def take_notification_hint(self, notification: dict[str, Any]) -> None:
        """Note the partition and position a notification announces, so that partition
        is read first (no query needed to find it)."""
        partition = notification.get("partition")
        position = notification.get("position")
        if isinstance(partition, int) and isinstance(position, int):
            self._subscription._update_max_aggregated_stream_positions_cache(partition, position)

    def run(self, budget: TimeBudget | None = None) -> RunOnNotificationResult:
        """Same as `run_once`."""
        return self.run_once(budget=budget)

    def stop(self) -> None:
        """Stop after the message being handled (from any thread); final."""
        self._keep_running = False

    def run_once(self, budget: TimeBudget | None = None) -> RunOnNotificationResult:
        """Handle messages until none is left or `budget` is over.

        Returns `WORK_REMAINING` if it stopped for the budget, else `DONE_FOR_NOW`.
        Raises what a handler raised if the error handler says `ErrorAction.EXIT`.
        """
        subscription = self._subscription
        subscription._ensure_initialized()
        reader = subscription._reader
        try:
            result = self._run_batches(budget)
        except BaseException:
            # Commit what was acknowledged before the error; the error is what matters.
            with contextlib.suppress(Exception):
                reader.sync()
            raise
        # Between batches acknowledgements are only queued: commit them before returning.
        reader.sync()
        return result

    def _run_batches(self, budget: TimeBudget | None) -> RunOnNotificationResult:
        reader = self._subscription._reader
        while self._keep_running:
            claim = reader.claim(self._batch_size)
            if claim is None:
                break
            self._process(claim)
            if budget is not None and budget.over_budget():
                return RunOnNotificationResult.WORK_REMAINING
        return RunOnNotificationResult.DONE_FOR_NOW

    def handle(self, message: SubscriptionMessage[E]) -> None:
        """Handle one message with the message handler."""
        self._handler.handle(message)

    def _process(self, claim: Claim[E]) -> None:
        subscription = self._subscription
        reader = subscription._reader
        name = subscription.name
        state_provider = subscription._state_provider
        partition = claim.partition
        handle = self.handle
        try:
            for position, stored in claim.entries:
                if not self._keep_running:
                    break
                ack = AckOp(name, partition, position, state_provider, reader=reader, claim=claim)
                handle(SubscriptionMessage(partition, position, stored, ack))
                if ack.rolled_back:
                    break
                if not ack.executed:
                    reader.ack(claim, position)
                elif ack.in_caller_transaction:
                    # The handler acknowledged in its own transaction: go on only once it
                    # is committed, else the next acknowledgement would skip this message.
                    if not ack.committed():
                        break
        except BaseException:
            reader.release_after_error(claim)
            raise
        reader.release(claim, wait=False)


class BatchedAckSubscriptionRunner(SubscriptionRunner[E]):
    """Handles a subscription's messages, acknowledging once per batch
    (`AckStrategy.BATCHED`).

    When a handler fails (and the error handler says EXIT), the messages of the batch
    handled before it are acknowledged: only the failed message and those after it are
    delivered again.
    """

    def _process(self, claim: Claim[E]) -> None:
        reader = self._subscription._reader
        partition = claim.partition
        handle = self.handle
        handled: int | None = None
        try:
            for position, stored in claim.entries:
                if not self._keep_running:
                    break
                if handled is not None:
                    # Stop if the connection holding the partition lock died meanwhile.
                    reader.check(claim)
                handle(SubscriptionMessage(partition, position, stored, _NO_ACK))
                handled = position
        except BaseException:
            try:
                if handled is not None:
                    reader.ack(claim, handled)
            finally:
                reader.release_after_error(claim)
            raise
        try:
            if handled is not None:
                reader.ack(claim, handled)
        except BaseException:
            reader.release_after_error(claim)
            raise
        reader.release(claim, wait=False)
