"""The reader of subscriptions with lock or state providers of the user's: locks and
positions go through the providers' interfaces; the engine reads the stream (each
partition's max position, and the rows after the position the state provider holds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from .._interfaces import (
    AggregatedStreamView,
    LockProvider,
    MessageProtocol,
    SubscriptionStateProvider,
)
from .reader import REFUSED, Claim, Lock, Refused, Session, SubscriptionReader

if TYPE_CHECKING:
    from .._native import ClaimedBatch

E = TypeVar("E", bound=MessageProtocol)


class ProviderSubscriptionReader(SubscriptionReader[E]):
    """Reads batches with the given lock and state providers."""

    def __init__(
        self,
        subscription_name: str,
        stream: AggregatedStreamView[E],
        state_provider: SubscriptionStateProvider,
        lock_provider: LockProvider,
    ) -> None:
        super().__init__(subscription_name, stream)
        self._state_provider = state_provider
        self._lock_provider = lock_provider

    def _open_session(self) -> Session:
        dsn, store, stream = self._session_args
        # No state table: the session only reads the stream.
        return Session(dsn, store, stream, self._name, synchronous_commit=True)

    def try_lock(self, name: str) -> Lock | None:
        """Take a lock outside of a claim (state initialization)."""
        return Lock(name, None) if self._lock_provider.lock(name) else None

    def unlock(self, lock: Lock) -> None:
        """Release a lock taken with `try_lock`."""
        self._lock_provider.unlock(lock.name)

    def _positions(self, session: Session) -> tuple[dict[int, int], dict[int, int]]:
        maxima = {s.partition: s.max_position for s in session.partitions()}
        return maxima, dict(self._state_provider.read(self._name).positions)

    def _read(
        self, session: Session, partition: int, count: int
    ) -> tuple[Lock, ClaimedBatch] | Refused:
        name = self.lock_name(partition)
        if not self._lock_provider.lock(name):
            return REFUSED
        lock = Lock(name, None)
        try:
            after = self._state_provider.read(self._name).positions.get(partition, -1)
            batch = session.read_after(partition, None, after, count)
        except BaseException:
            self._lock_provider.unlock(name)
            raise
        assert batch is not None  # no lock key, so never refused
        return lock, batch

    def _store(self, session: Session, partition: int, position: int) -> None:
        self._state_provider.store(self._name, partition, position)

    def _unlock_claim(self, session: Session, lock: Lock, wait: bool) -> None:
        self._lock_provider.unlock(lock.name)

    def _forget_lock(self, lock: Lock) -> None:
        self._lock_provider.unlock(lock.name)

    def stored_position(self, claim: Claim[E]) -> int:
        """The committed position of the claimed partition."""
        return self._state_provider.read(self._name).positions.get(claim.partition, -1)
