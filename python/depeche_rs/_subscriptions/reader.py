"""The subscription read path: which partition to read next, its lock, its next batch.

`SubscriptionReader` is the interface the subscription and its runners use, with what
every reader shares: a `PartitionQueue` (fed by notification hints, refilled when it
runs dry), one engine session (`SubscriptionSession`) per reading thread, and
turning a batch's rows into `StoredMessage`s. Two readers implement it:

- `DbSubscriptionReader` (`db_reader.py`), for the default providers: the
  lock, the position, the batch, the acknowledgements and the unlock are all the
  engine's, pipelined on its connection;
- `ProviderSubscriptionReader` (`provider_reader.py`), for lock and state
  providers of the user's: those are called through their interfaces, and the engine
  only reads the stream.
"""

from __future__ import annotations

import abc
import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .._exceptions import SerializationError
from .._interfaces import AggregatedStreamView, MessageProtocol, StoredMessage, stored_message
from .._native import BatchRow, ClaimedBatch, SubscriptionSession
from .partition_queue import PartitionQueue

E = TypeVar("E", bound=MessageProtocol)

logger = logging.getLogger("depeche_rs.subscription")

Session = SubscriptionSession


class Lock:
    """A lock a reader holds: its depeche-db name, and its advisory lock key when the
    engine holds it on a session (None when a lock provider holds it)."""

    __slots__ = ("key", "name")

    def __init__(self, name: str, key: int | None) -> None:
        self.name = name
        self.key = key


class Claim(Generic[E]):
    """A locked partition and its next rows, read by `SubscriptionReader.claim`; its
    messages are deserialized one at a time by `SubscriptionReader.messages`."""

    __slots__ = (
        "acked",
        "count",
        "fetched",
        "keep_session",
        "last_fetched",
        "lock",
        "partition",
        "rows",
        "session",
    )

    def __init__(
        self,
        partition: int,
        lock: Lock,
        session: Session,
        rows: list[BatchRow],
        count: int,
        fetched: int,
        last_fetched: int,
    ) -> None:
        self.partition = partition
        self.lock = lock
        self.session = session
        # The rows to deliver: the first one holds a message.
        self.rows = rows
        self.count = count
        self.fetched = fetched
        self.last_fetched = last_fetched
        # The last position acknowledged through `SubscriptionReader.ack`.
        self.acked: int | None = None
        # A claim is ahead on the session: it stays with the caller after `release`.
        self.keep_session = False


class Ahead:
    """The next claim, sent by `SubscriptionReader.claim_ahead` while the caller handles
    the batch before it on the same session; `claim` takes it, `drop_ahead` gives it up."""

    __slots__ = ("lock", "partition", "session")

    def __init__(self, session: Session, partition: int, lock: Lock) -> None:
        self.session = session
        self.partition = partition
        self.lock = lock


class Refused:
    """A partition locked by another consumer."""


REFUSED = Refused()


class SessionPool:
    """Engine sessions for the threads of one reader: a thread takes one, uses it alone,
    and gives it back."""

    def __init__(self, open_session: Callable[[], Session]) -> None:
        self._open_session = open_session
        self._mutex = threading.Lock()
        self._idle: list[Session] = []
        self._open: set[Session] = set()

    def take(self) -> Session:
        """An idle session, or a new one."""
        with self._mutex:
            if self._idle:
                return self._idle.pop()
        session = self._open_session()
        with self._mutex:
            self._open.add(session)
        return session

    def give_back(self, session: Session) -> None:
        """Return a session taken with `take` (a closed one is dropped)."""
        with self._mutex:
            if session.closed:
                self._open.discard(session)
            else:
                self._idle.append(session)

    def discard(self, session: Session) -> None:
        """Close and drop a session taken with `take` (releasing its locks)."""
        session.close()
        with self._mutex:
            self._open.discard(session)

    def flush(self) -> None:
        """Wait until everything sent on idle sessions is done."""
        with self._mutex:
            idle = list(self._idle)
        for session in idle:
            if not session.closed:
                session.flush()

    def close(self) -> None:
        """Close every session, idle or taken."""
        with self._mutex:
            sessions = list(self._open)
            self._open.clear()
            self._idle.clear()
        for session in sessions:
            session.close()


class SubscriptionReader(abc.ABC, Generic[E]):
    """Reads batches for one subscription; safe to use from several threads."""

    def __init__(self, subscription_name: str, stream: AggregatedStreamView[E]) -> None:
        self._name = subscription_name
        store = stream.store
        self._serializer = store._serializer
        self._session_args = (store.dsn, store.name, stream.name)
        self._pool = SessionPool(self._open_session)
        self.partitions = PartitionQueue()

    @abc.abstractmethod
    def _open_session(self) -> Session:
        """A new engine session for this reader."""

    def close(self) -> None:
        """Close every connection (releasing the locks they hold)."""
        self._pool.close()

    def lock_name(self, partition: int | str) -> str:
        """depeche-db's lock name for a partition (or "init")."""
        return f"subscription-{self._name}-{partition}"

    # -- what each reader does its own way --------------------------------------------

    @abc.abstractmethod
    def try_lock(self, name: str) -> Lock | None:
        """Take a lock outside of a claim (state initialization)."""

    @abc.abstractmethod
    def unlock(self, lock: Lock) -> None:
        """Release a lock taken with `try_lock`."""

    @abc.abstractmethod
    def _positions(self, session: Session) -> tuple[dict[int, int], dict[int, int]]:
        """Every partition's max position, and the stored positions."""

    @abc.abstractmethod
    def _read(
        self, session: Session, partition: int, count: int
    ) -> tuple[Lock, ClaimedBatch] | Refused:
        """Lock the partition and read its stored position and next rows."""

    def _take(self, ahead: Ahead) -> tuple[Lock, ClaimedBatch] | Refused:
        """The result of a claim sent ahead."""
        raise NotImplementedError

    @abc.abstractmethod
    def _store(self, session: Session, partition: int, position: int) -> None:
        """Store `position` as the partition's acknowledged position."""

    @abc.abstractmethod
    def _unlock_claim(self, session: Session, lock: Lock, wait: bool) -> None:
        """Release a claim's lock, after its acknowledgements (committed, with `wait`)."""

    @abc.abstractmethod
    def _forget_lock(self, lock: Lock) -> None:
        """Give up a lock whose session was dropped (after an error)."""

    @abc.abstractmethod
    def stored_position(self, claim: Claim[E]) -> int:
        """The committed position of the claimed partition (read after our
        acknowledgements)."""

    # -- batches ----------------------------------------------------------------------

    def claim(self, count: int, ahead: Ahead | None = None) -> Claim[E] | None:
        """Lock the next partition with unread messages and read up to `count` of them;
        the claim sent `ahead`, if given, first.

        Returns None when no partition has anything to read (or all such are locked).
        """
        session = self._pool.take() if ahead is None else ahead.session
        refused: list[int] = []
        refreshed = False
        try:
            if ahead is not None:
                claim = self._try_claim(session, ahead.partition, count, ahead)
                if isinstance(claim, Refused):
                    refused.append(ahead.partition)
                elif claim is not None:
                    return claim
            while True:
                partition = self.partitions.pop()
                if partition is None:
                    if refreshed:
                        self._pool.give_back(session)
                        return None
                    maxima, positions = self._positions(session)
                    self.partitions.refill(maxima, positions, refused)
                    refreshed = True
                    continue
                claim = self._try_claim(session, partition, count)
                if isinstance(claim, Refused):
                    refused.append(partition)
                elif claim is not None:
                    return claim
        except BaseException:
            self._pool.discard(session)
            raise
        finally:
            # Locked by another consumer: try again on a later call, after the others.
            for partition in refused:
                self.partitions.requeue(partition)

    def claim_ahead(self, claim: Claim[E], count: int) -> Ahead | None:
        """Send the claim of the next partition on `claim`'s session now, so that the
        server reads it while the caller handles `claim`; pass it to `claim` next, or
        to `drop_ahead`. None when no other partition is waiting (or this reader
        cannot claim ahead)."""
        return None

    def drop_ahead(self, ahead: Ahead) -> None:
        """Give up a claim sent ahead: unlock it and queue its partition again."""

    def _try_claim(
        self, session: Session, partition: int, count: int, ahead: Ahead | None = None
    ) -> Claim[E] | Refused | None:
        """The claim (the one sent `ahead`, if given), `REFUSED` if the partition is
        locked elsewhere, None if it has nothing to read."""
        read = self._read(session, partition, count) if ahead is None else self._take(ahead)
        if isinstance(read, Refused):
            return read
        lock, batch = read
        rows = batch.rows
        try:
            # Positions at the start whose messages are no longer in the store are
            # acknowledged, to skip them.
            missing = 0
            while missing < len(rows) and rows[missing].stored is None:
                logger.warning(
                    "subscription %s: partition %s position %s points to a message that is "
                    "no longer in the store; skipping it",
                    self._name,
                    partition,
                    rows[missing].position,
                )
                missing += 1
            position = batch.position
            if missing:
                position = rows[missing - 1].position
                self._store(session, partition, position)
            self.partitions.note_position(partition, position)
        except BaseException:
            self._unlock_claim(session, lock, wait=False)
            raise
        if missing == len(rows):
            self._unlock_claim(session, lock, wait=False)
            if len(rows) >= count:
                self.partitions.requeue(partition)
            return None
        return Claim(partition, lock, session, rows[missing:], count, len(rows), rows[-1].position)

    def messages(self, claim: Claim[E]) -> Iterator[tuple[int, StoredMessage[E]]]:
        """The claim's messages as (position, StoredMessage), each deserialized when it
        is reached (a message handled before the next is read is garbage by then), up to
        the first gap or failure.

        Raises `SerializationError` if the first message cannot be deserialized; a later
        one ends the iteration instead: what precedes it is delivered, and the next
        batch starts with it (and fails).
        """
        deserialize = self._serializer.deserialize
        loads = json.loads
        first = True
        for row in claim.rows:
            stored = row.stored
            if stored is None:
                # Keep batches gap-free; the next batch starts at the gap.
                return
            try:
                message = deserialize(loads(stored.message))
            except Exception as exc:
                if not first:
                    return
                raise SerializationError(
                    f"cannot deserialize message {stored.message_id} (stream "
                    f"{stored.stream!r}, version {stored.version}) at partition "
                    f"{claim.partition} position {row.position}: {exc}"
                ) from exc
            first = False
            yield row.position, stored_message(stored, message)

    # -- acknowledgements -------------------------------------------------------------

    def ack(self, claim: Claim[E], position: int) -> None:
        """Acknowledge `position` of the claimed partition."""
        self._store(claim.session, claim.partition, position)
        claim.acked = position

    def check(self, claim: Claim[E]) -> None:
        """Raise if the claim's connection was found lost (a dead connection's advisory
        lock is gone, so the batch must stop); never blocks."""
        claim.session.check()

    def release(self, claim: Claim[E], wait: bool = True) -> None:
        """Finish a claim: unlock the partition (after its acknowledgements).

        With `wait`, return once the acknowledgements are committed; without, they are
        only queued (the next statement on the connection, or `sync`, waits for them).
        """
        session = claim.session
        try:
            self._unlock_claim(session, claim.lock, wait)
        except BaseException:
            self._pool.discard(session)
            raise
        partition = claim.partition
        if claim.acked is not None:
            self.partitions.note_position(partition, claim.acked)
        if (
            claim.acked is None
            or claim.acked < claim.last_fetched
            or claim.fetched >= claim.count
            or self.partitions.known_max(partition) > claim.last_fetched
        ):
            # At the back: a partition that keeps failing does not starve the others.
            self.partitions.requeue(partition)
        if not claim.keep_session:
            self._pool.give_back(session)

    def release_after_error(self, claim: Claim[E]) -> None:
        """Unlock after an error; if that fails too, drop the connection (and its locks)."""
        try:
            self.release(claim)
        except Exception:
            self.abandon(claim)

    def sync(self) -> None:
        """Wait until everything queued on idle connections is committed."""
        self._pool.flush()

    def abandon(self, claim: Claim[E]) -> None:
        """Finish a claim after a database error: drop the connection (and its locks)."""
        self._pool.discard(claim.session)
        self._forget_lock(claim.lock)
        self.partitions.forget_position(claim.partition)
        self.partitions.requeue(claim.partition)
