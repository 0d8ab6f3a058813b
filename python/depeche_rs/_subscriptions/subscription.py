"""Subscriptions: reading an aggregated stream partition by partition, in order, with
at-least-once delivery and competing consumers.

Guarantees:

- every message is delivered at least once; within a partition, in position order;
- one consumer per (subscription, partition) at a time, across threads and processes
  (an advisory lock per partition, held while a batch is processed);
- the state (last acknowledged position per partition) survives restarts, and never
  moves past a message whose handler failed unless the error handler said IGNORE;
- `AckStrategy.SINGLE` acknowledges each message right after its handler returns;
  `AckStrategy.BATCHED` acknowledges once per batch, and after a failure acknowledges
  the messages handled before it, so only the failed message and those after it are
  delivered again (depeche-db 0.13 stores -1 when the first message of a batch fails,
  replaying the whole partition);
- a handler taking `SubscriptionMessage` can acknowledge inside its own transaction,
  `message.ack.execute(conn=conn)`: its writes and the new position commit together
  (exactly-once processing of the handler's database effects).

Here are the subscription and the runners that read its batches and call the handlers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import weakref
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from .._db.connection import connect
from .._interfaces import (
    AggregatedStreamView,
    LockProvider,
    MessageProtocol,
    RunOnNotificationResult,
    SubscriptionMessage,
    SubscriptionMessageBatch,
    SubscriptionStartPoint,
    SubscriptionStateProvider,
    TimeBudget,
)
from .._names import validate_name
from ..tools._db_lock_provider import DbLockProvider
from ..tools._db_subscription_state_provider import DbSubscriptionStateProvider
from .ack import _NO_ACK, AckOp, AckRolledback, AckStrategy
from .db_reader import DbSubscriptionReader
from .message_handler import SubscriptionMessageHandler
from .provider_reader import ProviderSubscriptionReader
from .reader import Claim, SubscriptionReader

E = TypeVar("E", bound=MessageProtocol)

DEFAULT_BATCH_SIZE = 10
_INIT_POLL_SECONDS = 0.05


def _close_connections(reader: SubscriptionReader[Any], own_locks: DbLockProvider | None) -> None:
    try:
        reader.close()
    finally:
        if own_locks is not None:
            own_locks.close()


@dataclasses.dataclass
class _ClaimedBatch(SubscriptionMessageBatch[E]):
    """A batch handed out by `get_next_message_batch`, holding its partition's lock."""

    claim: Claim[E] | None = dataclasses.field(default=None, repr=False, compare=False)


class Subscription(Generic[E]):
    """Reads an aggregated stream, partition by partition, for one consumer group.

    Usually created with `stream.subscription(...)`; run it with `subscription.runner`
    (`run_once()`, or register the runner with an `Executor`).

    Args:
        name: Subscription name, an identifier (also the default state table and lock
            namespace, as in depeche-db).
        stream: The aggregated stream to read.
        message_handler: Calls the handlers.
        batch_size: Messages read per batch (default 10).
        state_provider: Where positions are stored; defaults to
            `DbSubscriptionStateProvider(name, engine)`.
        lock_provider: Partition locks; defaults to `DbLockProvider(name, engine)`.
        start_point: Where a new subscription starts; defaults to the beginning.
        ack_strategy: `AckStrategy.SINGLE` (default) or `AckStrategy.BATCHED`.

    Raises:
        InvalidNameError: `name` is not an identifier.
    """

    runner: SubscriptionRunner[E] | BatchedAckSubscriptionRunner[E]

    def __init__(
        self,
        name: str,
        stream: AggregatedStreamView[E],
        message_handler: SubscriptionMessageHandler[E],
        batch_size: int | None = None,
        state_provider: SubscriptionStateProvider | None = None,
        lock_provider: LockProvider | None = None,
        start_point: SubscriptionStartPoint | None = None,
        ack_strategy: AckStrategy = AckStrategy.SINGLE,
    ) -> None:
        self.name = validate_name(name, "subscription name")
        if batch_size is not None and (
            not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(ack_strategy, AckStrategy):
            raise ValueError(
                f"ack_strategy must be AckStrategy.SINGLE or AckStrategy.BATCHED, got "
                f"{ack_strategy!r}"
            )
        if start_point is not None and not callable(getattr(start_point, "init_state", None)):
            raise TypeError(
                f"start_point must be a SubscriptionStartPoint, got {type(start_point).__name__}"
            )
        self._stream = stream
        engine = stream.store.engine
        # A lock provider we make is ours to close; one given is its owner's.
        own_locks: DbLockProvider | None = None
        if lock_provider is None:
            own_locks = lock_provider = DbLockProvider(name, engine)
        self._own_locks = own_locks
        self._lock_provider: LockProvider = lock_provider
        self._state_provider: SubscriptionStateProvider = (
            state_provider or DbSubscriptionStateProvider(name, engine)
        )
        self._start_point = start_point
        self._initialized = False
        self._reader = self._make_reader()
        # Connections close with close(), the store's close() or engine.dispose(), when
        # the subscription is collected, or at exit.
        self._finalizer = weakref.finalize(self, _close_connections, self._reader, own_locks)
        stream.store._connection_owners.add(self.close)
        runner_type = (
            BatchedAckSubscriptionRunner
            if ack_strategy == AckStrategy.BATCHED
            else SubscriptionRunner
        )
        self.runner = runner_type(
            subscription=self, message_handler=message_handler, batch_size=batch_size
        )

    def _make_reader(self) -> SubscriptionReader[E]:
        state, locks = self._state_provider, self._lock_provider
        if DbSubscriptionReader.serves(self._stream, state, locks):
            assert isinstance(state, DbSubscriptionStateProvider)
            assert isinstance(locks, DbLockProvider)
            return DbSubscriptionReader(self.name, self._stream, state, locks)
        return ProviderSubscriptionReader(self.name, self._stream, state, locks)

    @property
    def stream(self) -> AggregatedStreamView[E]:
        """The aggregated stream read."""
        return self._stream

    def close(self) -> None:
        """Close the subscription's connections (releasing any lock they hold); used
        again, it opens new ones."""
        _close_connections(self._reader, self._own_locks)

    def _update_max_aggregated_stream_positions_cache(
        self, partition_number: int, max_position: int
    ) -> None:
        self._reader.partitions.hint(partition_number, max_position)

    def _ensure_initialized(self) -> None:
        if self._initialized:
            return
        if not self._state_provider.initialized(self.name):
            self._init_state()
        self._initialized = True

    def _init_state(self) -> None:
        lock_name = self._reader.lock_name("init")
        while True:
            lock = self._reader.try_lock(lock_name)
            if lock is not None:
                try:
                    if not self._state_provider.initialized(self.name):
                        self._run_start_point()
                finally:
                    self._reader.unlock(lock)
                return
            # Another consumer is initializing: wait for it, or for its lock to go away.
            if self._state_provider.initialized(self.name):
                return
            time.sleep(_INIT_POLL_SECONDS)

    def _run_start_point(self) -> None:
        provider = self._state_provider
        if not isinstance(provider, DbSubscriptionStateProvider):
            self._start(provider)
            return
        # The start positions and the "initialized" mark commit together.
        with connect(provider.engine) as conn:
            self._start(provider.session(conn=conn))
            conn.commit()

    def _start(self, state: SubscriptionStateProvider) -> None:
        if self._start_point is not None:
            self._start_point.init_state(
                subscription_name=self.name, stream=self._stream, state_provider=state
            )
        state.initialize(self.name)

    def get_next_message_batch(self, count: int) -> SubscriptionMessageBatch[E] | None:
        """Lock the next partition with unread messages and return up to `count` of them.

        Acknowledge handled messages with `batch.ack(message)`, then finish with
        `ack_message_batch(batch, success=True)` (or `unlock_message_batch(batch)`); the
        partition stays locked until then. Returns None when there is nothing to read.
        """
        self._ensure_initialized()
        claim = self._reader.claim(count)
        if claim is None:
            return None
        partition = claim.partition
        try:
            messages = [
                SubscriptionMessage(
                    partition=partition, position=position, stored_message=stored, ack=_NO_ACK
                )
                for position, stored in self._reader.messages(claim)
            ]
        except BaseException:
            self._reader.release_after_error(claim)
            raise
        return _ClaimedBatch(
            partition=partition,
            first_position=messages[0].position,
            last_position=messages[-1].position,
            lock_key=claim.lock.name,
            messages=messages,
            claim=claim,
        )

    def ack_message_batch(self, message_batch: SubscriptionMessageBatch[E], success: bool) -> None:
        """Store the batch's acknowledged position (if `success` and any message was
        acknowledged) and unlock its partition."""
        claim = self._take_claim(message_batch)
        if claim is None:
            return
        try:
            if success and message_batch.ackd_position >= message_batch.first_position:
                self._reader.ack(claim, message_batch.ackd_position)
        except BaseException:
            self._reader.abandon(claim)
            raise
        self._reader.release(claim)

    def unlock_message_batch(self, message_batch: SubscriptionMessageBatch[E]) -> None:
        """Unlock the batch's partition without storing anything."""
        claim = self._take_claim(message_batch)
        if claim is not None:
            self._reader.release(claim)

    @staticmethod
    def _take_claim(message_batch: SubscriptionMessageBatch[E]) -> Claim[E] | None:
        if not isinstance(message_batch, _ClaimedBatch):
            raise TypeError(
                "the batch was not returned by this subscription's get_next_message_batch"
            )
        claim, message_batch.claim = message_batch.claim, None
        return claim

    def get_next_messages(self, count: int) -> Iterator[SubscriptionMessage[E]]:
        """Yield up to `count` messages of one partition, acknowledging each one when
        the next is requested (`AckStrategy.SINGLE` semantics).

        A message whose `ack` was executed in the caller's transaction is checked to be
        committed; if it is not (or `ack.rollback()` was called), iteration stops and the
        message will be delivered again.
        """
        self._ensure_initialized()
        reader = self._reader
        claim = reader.claim(count)
        if claim is None:
            return
        failed = False
        try:
            for position, stored in reader.messages(claim):
                ack = AckOp(
                    self.name,
                    claim.partition,
                    position,
                    self._state_provider,
                    reader=reader,
                    claim=claim,
                )
                yield SubscriptionMessage(
                    partition=claim.partition, position=position, stored_message=stored, ack=ack
                )
                if ack.rolled_back:
                    break
                try:
                    ack.execute()
                except AckRolledback:
                    break
        except GeneratorExit:
            raise
        except BaseException:
            failed = True
            raise
        finally:
            if failed:
                reader.release_after_error(claim)
            else:
                reader.release(claim)


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
        count = self._batch_size
        if not self._keep_running:
            return RunOnNotificationResult.DONE_FOR_NOW
        claim = reader.claim(count)
        while claim is not None:
            # The next partition is locked and read while this batch is handled.
            ahead = reader.claim_ahead(claim, count)
            try:
                self._process(claim)
            except BaseException:
                if ahead is not None:
                    reader.drop_ahead(ahead)
                raise
            over_budget = budget is not None and budget.over_budget()
            if over_budget or not self._keep_running:
                if ahead is not None:
                    reader.drop_ahead(ahead)
                if over_budget:
                    return RunOnNotificationResult.WORK_REMAINING
                break
            claim = reader.claim(count, ahead)
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
            for position, stored in reader.messages(claim):
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
            for position, stored in reader.messages(claim):
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
