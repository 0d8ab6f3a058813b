"""Which partition a subscription reads next.

A queue of partitions that probably have unread messages, fed by notification hints
(at the front: new messages keep live latency low), by partitions that had more than one
batch (at the back: round robin), and, when it runs dry, by one query over the
per-partition max positions and the subscription's positions (never a scan of the
stream). What it knows may be stale; the batch query reads the truth under the lock.
"""

from __future__ import annotations

import collections
import random
import threading
from collections.abc import Iterable, Mapping


class PartitionQueue:
    """Partitions to try, and what is known of their max and acknowledged positions.

    Thread-safe: hints arrive from the thread reading notifications.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._max_positions: dict[int, int] = {}
        self._positions: dict[int, int] = {}
        self._queue: collections.deque[int] = collections.deque()
        self._queued: set[int] = set()

    def hint(self, partition: int, position: int) -> None:
        """Note that `partition` has messages up to `position` (from a notification)."""
        with self._mutex:
            if position > self._max_positions.get(partition, -1):
                self._max_positions[partition] = position
            if partition not in self._queued and position > self._positions.get(partition, -1):
                self._queue.appendleft(partition)
                self._queued.add(partition)

    def pop(self) -> int | None:
        """The next partition that may have unread messages, or None."""
        with self._mutex:
            while self._queue:
                partition = self._queue.popleft()
                self._queued.discard(partition)
                known_max = self._max_positions.get(partition)
                if known_max is None or known_max > self._positions.get(partition, -1):
                    return partition
            return None

    def requeue(self, partition: int) -> None:
        """Try `partition` again after the others."""
        with self._mutex:
            if partition not in self._queued:
                self._queue.append(partition)
                self._queued.add(partition)

    def refill(
        self, maxima: Mapping[int, int], positions: Mapping[int, int], skip: Iterable[int]
    ) -> None:
        """Take the database's max and acknowledged positions, and queue (in random
        order, so competing consumers start at different places) every partition
        behind, except those in `skip`. The database may leave out partitions that are
        not behind: what is known of them stays (positions only grow, so it is at most
        stale low, which costs one empty read)."""
        skipped = set(skip)
        behind = [p for p, m in maxima.items() if m > positions.get(p, -1) and p not in skipped]
        random.shuffle(behind)
        with self._mutex:
            for partition, maximum in maxima.items():
                if maximum > self._max_positions.get(partition, -1):
                    self._max_positions[partition] = maximum
            self._positions.update(positions)
            for partition in behind:
                if partition not in self._queued:
                    self._queue.append(partition)
                    self._queued.add(partition)

    def note_position(self, partition: int, position: int) -> None:
        """Note the partition's acknowledged position."""
        with self._mutex:
            self._positions[partition] = position

    def forget_position(self, partition: int) -> None:
        """Forget what is known of the partition's position (after an error)."""
        with self._mutex:
            self._positions.pop(partition, None)

    def known_max(self, partition: int) -> int:
        """The highest position known for `partition` (-1 if unknown)."""
        with self._mutex:
            return self._max_positions.get(partition, -1)
