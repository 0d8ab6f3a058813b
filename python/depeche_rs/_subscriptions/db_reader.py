"""The reader of subscriptions with the default providers (`DbLockProvider` and
`DbSubscriptionStateProvider` on the stream's database): all of the database work is
the engine's, on one pipelined connection per reading thread.

- claiming a partition sends the advisory lock (depeche-db's key) and the batch query
  together, one round trip; the batch query reads the partition's position from the
  state table and the rows after it, and runs after the lock is granted, so it sees
  every acknowledgement the previous holder committed before unlocking;
- acknowledgements and the unlock are sent without waiting; the server applies them in
  order, so the state is committed before the lock is released;
- a runner claims the next partition ahead, on the same connection, as soon as it has
  its batch: the server locks and reads it while the handlers run;
- the `DbLockProvider` also records the lock names, so threads of this process using
  the provider directly and the subscription exclude each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from .._interfaces import (
    AggregatedStreamView,
    LockProvider,
    MessageProtocol,
    SubscriptionStateProvider,
)
from ..tools._db_lock_provider import DbLockProvider
from ..tools._db_subscription_state_provider import DbSubscriptionStateProvider
from .reader import REFUSED, Ahead, Claim, Lock, Refused, Session, SubscriptionReader

if TYPE_CHECKING:
    from .._native import ClaimedBatch

E = TypeVar("E", bound=MessageProtocol)


class DbSubscriptionReader(SubscriptionReader[E]):
    """Reads batches with the engine: partition locks, positions and acknowledgements
    in the database, as `DbLockProvider` and `DbSubscriptionStateProvider` keep them."""

    @staticmethod
    def serves(
        stream: AggregatedStreamView[Any],
        state_provider: SubscriptionStateProvider,
        lock_provider: LockProvider,
    ) -> bool:
        """True when both providers are the default ones on the stream's database."""
        dsn = stream.store.dsn
        return (
            isinstance(lock_provider, DbLockProvider)
            and lock_provider.dsn == dsn
            and isinstance(state_provider, DbSubscriptionStateProvider)
            and state_provider.dsn == dsn
        )

    def __init__(
        self,
        subscription_name: str,
        stream: AggregatedStreamView[E],
        state_provider: DbSubscriptionStateProvider,
        lock_provider: DbLockProvider,
    ) -> None:
        super().__init__(subscription_name, stream)
        self._locks = lock_provider
        self._state = state_provider
        self._held_sessions: dict[str, Session] = {}

    def _open_session(self) -> Session:
        dsn, store, stream = self._session_args
        return Session(
            dsn,
            store,
            stream,
            self._name,
            state_table=self._state.table,
            synchronous_commit=self._state.synchronous_commit,
        )

    def try_lock(self, name: str) -> Lock | None:
        """Take a lock outside of a claim (state initialization)."""
        if not self._locks.claim(name):
            return None
        key = self._locks.key(name)
        session = self._pool.take()
        try:
            locked = session.try_lock(key)
        except BaseException:
            self._locks.release_claim(name)
            self._pool.discard(session)
            raise
        if not locked:
            self._locks.release_claim(name)
            self._pool.give_back(session)
            return None
        # Held on this session: keep it out of the pool until `unlock`.
        self._held_sessions[name] = session
        return Lock(name, key)

    def unlock(self, lock: Lock) -> None:
        """Release a lock taken with `try_lock`."""
        session = self._held_sessions.pop(lock.name)
        self._unlock_claim(session, lock, wait=False)
        self._pool.give_back(session)

    def _positions(self, session: Session) -> tuple[dict[int, int], dict[int, int]]:
        states = session.partitions()
        return (
            {s.partition: s.max_position for s in states},
            {s.partition: s.position for s in states},
        )

    def _read(
        self, session: Session, partition: int, count: int
    ) -> tuple[Lock, ClaimedBatch] | Refused:
        name = self.lock_name(partition)
        if not self._locks.claim(name):
            return REFUSED
        lock = Lock(name, self._locks.key(name))
        try:
            batch = session.claim(partition, lock.key, count)
        except BaseException:
            self._locks.release_claim(name)
            raise
        if batch is None:
            self._locks.release_claim(name)
            return REFUSED
        return lock, batch

    def claim_ahead(self, claim: Claim[E], count: int) -> Ahead | None:
        """Send the next partition's claim on `claim`'s session (see the base class)."""
        partition = self.partitions.pop()
        if partition is None:
            return None
        name = self.lock_name(partition)
        if not self._locks.claim(name):
            # Held by a thread of this process: later, after the others.
            self.partitions.requeue(partition)
            return None
        lock = Lock(name, self._locks.key(name))
        try:
            assert lock.key is not None
            claim.session.claim_ahead(partition, lock.key, count)
        except BaseException:
            self._locks.release_claim(name)
            self.partitions.requeue(partition)
            raise
        claim.keep_session = True
        return Ahead(claim.session, partition, lock)

    def _take(self, ahead: Ahead) -> tuple[Lock, ClaimedBatch] | Refused:
        try:
            batch = ahead.session.take_ahead()
        except BaseException:
            self._locks.release_claim(ahead.lock.name)
            raise
        if batch is None:
            self._locks.release_claim(ahead.lock.name)
            return REFUSED
        return ahead.lock, batch

    def drop_ahead(self, ahead: Ahead) -> None:
        """Give up a claim sent ahead (see the base class); never raises `Exception`: a
        session that fails here is closed, and its locks go with it."""
        session = ahead.session
        try:
            if self._take(ahead) is not REFUSED:
                self._unlock_claim(session, ahead.lock, wait=False)
            self._pool.give_back(session)
        except Exception:
            self._pool.discard(session)
        finally:
            self.partitions.requeue(ahead.partition)

    def _store(self, session: Session, partition: int, position: int) -> None:
        session.ack(partition, position)

    def _unlock_claim(self, session: Session, lock: Lock, wait: bool) -> None:
        try:
            if not session.closed:
                assert lock.key is not None
                session.unlock(lock.key)
        finally:
            self._locks.release_claim(lock.name)
        if wait and not session.closed:
            session.flush()

    def _forget_lock(self, lock: Lock) -> None:
        self._locks.release_claim(lock.name)

    def stored_position(self, claim: Claim[E]) -> int:
        """The committed position of the claimed partition (read after our queued
        acknowledgements)."""
        return claim.session.stored_position(claim.partition)
