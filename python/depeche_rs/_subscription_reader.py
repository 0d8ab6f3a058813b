"""The subscription read path: which partition to read next, its lock, its next batch.

With the default providers (`DbLockProvider`, `DbSubscriptionStateProvider` on the
stream's database) everything goes through one pipelined connection per reading thread:

- claiming a partition sends the advisory lock and the batch query together (one round
  trip); the batch query reads the partition's position from the state table, the next
  pointers from the aggregated stream and the message bodies, in one statement that
  runs after the lock is granted, so it sees every acknowledgement the previous holder
  committed before unlocking;
- acknowledgements and the unlock are sent without waiting; the server applies them in
  order, so the state is committed before the lock is released;
- the partition to read comes from a `PartitionQueue`, refilled when it runs dry by one
  query over the per-partition max positions joined to the state.

Other providers work through their own interfaces, with the same batch query.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import _names
from ._exceptions import SerializationError
from ._interfaces import (
    LockProvider,
    MessageProtocol,
    StoredMessage,
    SubscriptionStateProvider,
)
from ._partition_queue import PartitionQueue
from ._pipelined_connection import ConnectionPool, Param, Pending, PipelinedConnection
from .tools._db_lock_provider import DbLockProvider
from .tools._db_subscription_state_provider import DbSubscriptionStateProvider

if TYPE_CHECKING:
    from ._aggregated_stream import AggregatedStream

E = TypeVar("E", bound=MessageProtocol)

logger = logging.getLogger("depeche_rs.subscription")

_LOCK = "SELECT pg_try_advisory_lock($1)"
_UNLOCK = "SELECT pg_advisory_unlock($1)"
# Acknowledgements never move a position backwards: an acknowledgement of ours still in
# flight must not undo a later one the handler committed in its own transaction.
_ACK = (
    "INSERT INTO {subs} AS s (subscription_name, partition, position) VALUES ($1, $2, $3) "
    "ON CONFLICT (subscription_name, partition) DO UPDATE SET position = excluded.position "
    "WHERE s.position < excluded.position"
)
_POSITION = "SELECT position FROM {subs} WHERE subscription_name = $1 AND partition = $2"
_BATCH_COLUMNS = (
    "a.position, m.message_id, m.stream, m.version, m.message, m.global_position, m.added_at"
)
# Always one row (the partition's position) even when nothing follows it.
_READ_WITH_STATE = (
    f"SELECT s.pos, {_BATCH_COLUMNS} "
    "FROM (SELECT coalesce((SELECT position FROM {subs} "
    "      WHERE subscription_name = $1 AND partition = $2), -1)::bigint AS pos) AS s "
    "LEFT JOIN LATERAL (SELECT position, message_id FROM {agg} "
    "      WHERE partition = $2 AND position > s.pos ORDER BY position LIMIT $3) AS a ON true "
    "LEFT JOIN {msgs} AS m ON m.message_id = a.message_id "
    "ORDER BY a.position"
)
_READ_AFTER = (
    f"SELECT $2::bigint, {_BATCH_COLUMNS} "
    "FROM (SELECT position, message_id FROM {agg} "
    "      WHERE partition = $1 AND position > $2 ORDER BY position LIMIT $3) AS a "
    "LEFT JOIN {msgs} AS m ON m.message_id = a.message_id "
    "ORDER BY a.position"
)
_PARTITIONS_WITH_STATE = (
    "SELECT p.partition, p.max_position, coalesce(s.position, -1) FROM {maxpos} AS p "
    "LEFT JOIN {subs} AS s ON s.subscription_name = $1 AND s.partition = p.partition"
)
_PARTITIONS = "SELECT partition, max_position FROM {maxpos}"
# How often a batch in progress looks whether its connection (and lock) is still there.
_CHECK_SECONDS = 0.001


class Claim(Generic[E]):
    """A locked partition and its next messages, read by `SubscriptionReader.claim`."""

    __slots__ = (
        "acked",
        "count",
        "entries",
        "fetched",
        "last_fetched",
        "lock",
        "partition",
        "session",
    )

    def __init__(
        self,
        partition: int,
        lock: _Lock,
        session: PipelinedConnection,
        entries: list[tuple[int, StoredMessage[E]]],
        count: int,
        fetched: int,
        last_fetched: int,
    ) -> None:
        self.partition = partition
        self.lock = lock
        self.session = session
        self.entries = entries
        self.count = count
        self.fetched = fetched
        self.last_fetched = last_fetched
        # The last position acknowledged through `SubscriptionReader.ack`.
        self.acked: int | None = None


class _Refused:
    """A partition locked by another consumer."""


_REFUSED = _Refused()


class _Lock:
    __slots__ = ("key", "name")

    def __init__(self, name: str, key: int | None) -> None:
        self.name = name
        self.key = key


class SubscriptionReader(Generic[E]):
    """Reads batches for one subscription; safe to use from several threads."""

    def __init__(
        self,
        subscription_name: str,
        stream: AggregatedStream[E],
        state_provider: SubscriptionStateProvider,
        lock_provider: LockProvider,
    ) -> None:
        self._name = subscription_name
        store = stream.store
        self._dsn = store.dsn
        self._serializer = store._serializer
        self._state_provider = state_provider
        self._lock_provider = lock_provider
        self._db_locks = (
            lock_provider
            if isinstance(lock_provider, DbLockProvider) and lock_provider.dsn == self._dsn
            else None
        )
        self._db_state = (
            state_provider
            if isinstance(state_provider, DbSubscriptionStateProvider)
            and state_provider.dsn == self._dsn
            else None
        )
        names = {
            "agg": _names.stream_table(stream.name),
            "maxpos": _names.maxpos_table(stream.name),
            "msgs": _names.message_table(store.name),
            "subs": self._db_state.table if self._db_state is not None else "",
        }
        self._sql = {
            "ack": _ACK.format(**names),
            "pos": _POSITION.format(**names),
            "read_s": _READ_WITH_STATE.format(**names),
            "read": _READ_AFTER.format(**names),
            "parts_s": _PARTITIONS_WITH_STATE.format(**names),
            "parts": _PARTITIONS.format(**names),
        }
        setup = ["SET application_name = 'depeche-rs subscription'"]
        if self._db_state is not None and not self._db_state.synchronous_commit:
            setup.append("SET synchronous_commit = off")
        # One connection per thread reading at the same time.
        self._pool = ConnectionPool(self._dsn, setup)
        self.partitions = PartitionQueue()
        self._held_sessions: dict[str, PipelinedConnection] = {}
        self._checked_at = 0.0

    def _take_session(self) -> PipelinedConnection:
        return self._pool.take()

    def _give_back(self, session: PipelinedConnection) -> None:
        self._pool.give_back(session)

    def _discard(self, session: PipelinedConnection) -> None:
        self._pool.discard(session)

    def close(self) -> None:
        """Close every connection (releasing the locks they hold)."""
        self._pool.close()

    def _refill(self, session: PipelinedConnection, skip: list[int]) -> None:
        if self._db_state is not None:
            rows = session.wait(session.send(b"parts_s", self._sql["parts_s"], [self._name], True))
            maxima = {p: m for p, m, _ in rows}
            positions = {p: s for p, _, s in rows}
        else:
            rows = session.wait(session.send(b"parts", self._sql["parts"], [], True))
            maxima = {p: m for p, m in rows}
            positions = dict(self._state_provider.read(self._name).positions)
        self.partitions.refill(maxima, positions, skip)

    # -- locks ------------------------------------------------------------------------

    def lock_name(self, partition: int | str) -> str:
        """depeche-db's lock name for a partition (or "init")."""
        return f"subscription-{self._name}-{partition}"

    def try_lock(self, name: str) -> _Lock | None:
        """Take a lock outside of a claim (state initialization)."""
        if self._db_locks is None:
            return _Lock(name, None) if self._lock_provider.lock(name) else None
        if not self._db_locks.claim(name):
            return None
        key = self._db_locks.key(name)
        session = self._take_session()
        try:
            locked = session.wait(session.send(b"lock", _LOCK, [key], True))[0][0]
        except BaseException:
            self._db_locks.release_claim(name)
            self._discard(session)
            raise
        if not locked:
            self._db_locks.release_claim(name)
            self._give_back(session)
            return None
        # Held on this session: keep it out of the pool until `unlock`.
        self._held_sessions[name] = session
        return _Lock(name, key)

    def unlock(self, lock: _Lock) -> None:
        """Release a lock taken with `try_lock`."""
        if lock.key is None:
            self._lock_provider.unlock(lock.name)
            return
        session = self._held_sessions.pop(lock.name)
        self._release_lock(session, lock)
        self._give_back(session)

    def _release_lock(self, session: PipelinedConnection, lock: _Lock) -> None:
        if lock.key is None:
            if not session.closed:
                # Acknowledgements in flight must be committed before another consumer
                # can take the lock and read the state.
                session.wait_all()
            self._lock_provider.unlock(lock.name)
            return
        assert self._db_locks is not None
        try:
            if not session.closed:
                session.send(b"unlock", _UNLOCK, [lock.key])
        finally:
            self._db_locks.release_claim(lock.name)

    # -- batches ----------------------------------------------------------------------

    def claim(self, count: int) -> Claim[E] | None:
        """Lock the next partition with unread messages and read up to `count` of them.

        Returns None when no partition has anything to read (or all such are locked).
        """
        session = self._take_session()
        refused: list[int] = []
        refreshed = False
        try:
            while True:
                partition = self.partitions.pop()
                if partition is None:
                    if refreshed:
                        self._give_back(session)
                        return None
                    self._refill(session, skip=refused)
                    refreshed = True
                    continue
                claim = self._try_claim(session, partition, count)
                if isinstance(claim, _Refused):
                    refused.append(partition)
                elif claim is not None:
                    return claim
        except BaseException:
            self._discard(session)
            raise
        finally:
            # Locked by another consumer: try again on a later call, after the others.
            for partition in refused:
                self.partitions.requeue(partition)

    def _try_claim(
        self, session: PipelinedConnection, partition: int, count: int
    ) -> Claim[E] | _Refused | None:
        """The claim, `_REFUSED` if the partition is locked elsewhere, None if it has
        nothing to read."""
        name = self.lock_name(partition)
        lock_pending: Pending | None = None
        if self._db_locks is not None:
            if not self._db_locks.claim(name):
                return _REFUSED
            lock = _Lock(name, self._db_locks.key(name))
            lock_pending = session.send(b"lock", _LOCK, [lock.key], True)
        else:
            if not self._lock_provider.lock(name):
                return _REFUSED
            lock = _Lock(name, None)
        try:
            read = self._read(session, partition, count, lock_pending)
            if read is None:
                assert self._db_locks is not None
                self._db_locks.release_claim(name)
                return _REFUSED
            position, rows = read
            entries, skipped_to = self._decode(partition, rows)
            if skipped_to is not None:
                self._send_ack(session, partition, skipped_to)
                position = skipped_to
            self.partitions.note_position(partition, position)
        except BaseException:
            self._release_lock(session, lock)
            raise
        if not entries:
            self._release_lock(session, lock)
            if len(rows) >= count:
                self.partitions.requeue(partition)
            return None
        return Claim(partition, lock, session, entries, count, len(rows), rows[-1][1])

    def _read(
        self,
        session: PipelinedConnection,
        partition: int,
        count: int,
        lock_pending: Pending | None,
    ) -> tuple[int, list[tuple[Any, ...]]] | None:
        """The partition's position and the batch rows, or None if the lock was refused."""
        if self._db_state is not None:
            params: list[Param] = [self._name, partition, count]
            read = session.send(b"read_s", self._sql["read_s"], params, True)
            if lock_pending is not None and not session.wait(lock_pending)[0][0]:
                # Someone else holds the partition: the rows are stale, skip decoding them.
                read.want_rows = False
                return None
            rows = session.wait(read)
            # The first column is the position read from the state table; a partition
            # with nothing after it gives one row of NULL message columns.
            return int(rows[0][0]), [row for row in rows if row[1] is not None]
        if lock_pending is not None and not session.wait(lock_pending)[0][0]:
            return None
        after = self._state_provider.read(self._name).positions.get(partition, -1)
        rows = session.wait(
            session.send(b"read", self._sql["read"], [partition, after, count], True)
        )
        return after, rows

    def _decode(
        self, partition: int, rows: list[tuple[Any, ...]]
    ) -> tuple[list[tuple[int, StoredMessage[E]]], int | None]:
        """Deserialize rows into (position, StoredMessage) up to the first gap or failure.

        Returns the entries and, if the batch starts with pointers to messages missing
        from the store, the position to acknowledge to skip them.
        """
        entries: list[tuple[int, StoredMessage[E]]] = []
        skipped_to: int | None = None
        deserialize = self._serializer.deserialize
        for _, position, message_id, stream, version, body, global_position, added_at in rows:
            if message_id is None:
                if entries:
                    # Keep batches gap-free; the next batch starts at the gap.
                    break
                logger.warning(
                    "subscription %s: partition %s position %s points to a message that is "
                    "no longer in the store; skipping it",
                    self._name,
                    partition,
                    position,
                )
                skipped_to = position
                continue
            try:
                message = deserialize(body)
            except Exception as exc:
                if entries:
                    # Deliver what precedes it; the next batch starts with it and fails.
                    break
                raise SerializationError(
                    f"cannot deserialize message {message_id} (stream {stream!r}, version "
                    f"{version}) at partition {partition} position {position}: {exc}"
                ) from exc
            entries.append(
                (
                    position,
                    StoredMessage(
                        message_id=message_id,
                        stream=stream,
                        version=version,
                        message=message,
                        global_position=global_position,
                        added_at=added_at,
                    ),
                )
            )
        return entries, skipped_to

    # -- acknowledgements -------------------------------------------------------------

    def ack(self, claim: Claim[E], position: int) -> None:
        """Acknowledge `position` of the claimed partition.

        With the default state provider the acknowledgement is queued on the claim's
        connection and committed in order, before the unlock; otherwise it is stored
        through the state provider.
        """
        self._send_ack(claim.session, claim.partition, position)
        claim.acked = position

    def _send_ack(self, session: PipelinedConnection, partition: int, position: int) -> None:
        if self._db_state is None:
            self._state_provider.store(self._name, partition, position)
            return
        session.send(b"ack", self._sql["ack"], [self._name, partition, position])
        self._check_now(session)

    def check(self, claim: Claim[E]) -> None:
        """Raise if the claim's connection (and so its partition lock) was found lost.

        Looks at most every `_CHECK_SECONDS`: a dead connection's advisory lock is gone,
        so the batch must stop, but a look costs a few system calls.
        """
        self._check_now(claim.session)

    def _check_now(self, session: PipelinedConnection) -> None:
        now = time.monotonic()
        if now - self._checked_at >= _CHECK_SECONDS:
            self._checked_at = now
            session.check()

    def stored_position(self, claim: Claim[E]) -> int:
        """The committed position of the claimed partition (read after our queued
        acknowledgements)."""
        partition = claim.partition
        if self._db_state is None:
            return self._state_provider.read(self._name).positions.get(partition, -1)
        session = claim.session
        rows = session.wait(session.send(b"pos", self._sql["pos"], [self._name, partition], True))
        return int(rows[0][0]) if rows else -1

    def release(self, claim: Claim[E], wait: bool = True) -> None:
        """Finish a claim: unlock the partition (after its acknowledgements).

        With `wait`, return once the acknowledgements are committed; without, they are
        only queued (the next statement on the connection, or `sync`, waits for them).
        """
        session = claim.session
        try:
            self._release_lock(session, claim.lock)
            if wait and not session.closed:
                session.wait_all()
        except BaseException:
            self._discard(session)
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
        self._give_back(session)

    def release_after_error(self, claim: Claim[E]) -> None:
        """Unlock after an error; if that fails too, drop the connection (and its locks)."""
        try:
            self.release(claim)
        except Exception:
            self.abandon(claim)

    def sync(self) -> None:
        """Wait until everything queued on idle connections is committed."""
        self._pool.wait_all()

    def abandon(self, claim: Claim[E]) -> None:
        """Finish a claim after a database error: drop the connection (and its locks)."""
        self._discard(claim.session)
        if claim.lock.key is None:
            self._lock_provider.unlock(claim.lock.name)
        elif self._db_locks is not None:
            self._db_locks.release_claim(claim.lock.name)
        self.partitions.forget_position(claim.partition)
        self.partitions.requeue(claim.partition)
