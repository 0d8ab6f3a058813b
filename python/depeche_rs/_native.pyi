"""Stubs of the Rust extension module. Users import `depeche_rs`, never this."""

import datetime
import uuid
from collections.abc import Callable
from typing import Any, final

__all__ = [
    "BatchRow",
    "ClaimedBatch",
    "PartitionState",
    "Projector",
    "ReadAheadCounts",
    "ResolveRow",
    "RunOutcome",
    "StoredRow",
    "SubscriptionSession",
    "__version__",
    "hash_mod_partition",
    "stream_name_partition",
]

__version__: str

def stream_name_partition(stream: str) -> int:
    """First two bytes of sha256(stream), little endian."""

def hash_mod_partition(stream: str, n: int) -> int:
    """First eight bytes of sha256(stream), little endian, modulo n."""

@final
class Projector:
    """One aggregated stream's projector: one connection, a second one to read ahead."""

    def __new__(
        cls,
        dsn: str,
        store: str,
        stream: str,
        wildcards: list[str],
        batch_size: int,
        partitioner: str | None = None,
        modulus: int | None = None,
    ) -> Projector: ...
    def run(
        self,
        resolve: Callable[[list[ResolveRow], bool], list[tuple[int | None, datetime.datetime]]]
        | None = None,
        budget: Any = None,
        max_batches: int | None = None,
    ) -> RunOutcome:
        """Project batches."""
    def read_ahead_counts(self) -> ReadAheadCounts:
        """How reading ahead went since connecting."""
    def close(self) -> None:
        """Close the connections."""

@final
class RunOutcome:
    """What one `Projector.run` did."""

    @property
    def projected(self) -> int: ...
    @property
    def more(self) -> bool: ...
    @property
    def locked(self) -> bool: ...

@final
class ReadAheadCounts:
    """Batches that read ahead, read-aheads dropped, rows Python assigned while the
    batch before them was written."""

    @property
    def used(self) -> int: ...
    @property
    def discarded(self) -> int: ...
    @property
    def assigned(self) -> int: ...

@final
class ResolveRow:
    """A message the projector needs Python for: its partition or its time."""

    @property
    def message_id(self) -> uuid.UUID:
        """The message id."""
    @property
    def stream(self) -> str:
        """The origin stream."""
    @property
    def version(self) -> int:
        """The version in the origin stream."""
    @property
    def global_position(self) -> int:
        """The global position in the store."""
    @property
    def added_at(self) -> datetime.datetime:
        """When the message was written (naive UTC)."""
    @property
    def occurred_at(self) -> datetime.datetime | None:
        """The message time recorded at write time (naive UTC); settable."""
    @occurred_at.setter
    def occurred_at(self, value: datetime.datetime | None) -> None: ...
    @property
    def message(self) -> str | None:
        """The message body, JSON text, when it was read."""

@final
class BatchRow:
    """One position of a claimed partition and the message stored there."""

    @property
    def position(self) -> int:
        """Position in the partition."""
    @property
    def stored(self) -> StoredRow | None:
        """The message, or None when it is no longer in the store."""

@final
class StoredRow:
    """A message as stored, read with a batch."""

    @property
    def message_id(self) -> uuid.UUID:
        """The message id."""
    @property
    def stream(self) -> str:
        """The origin stream."""
    @property
    def version(self) -> int:
        """The version in the origin stream."""
    @property
    def message(self) -> str:
        """The message body, JSON text."""
    @property
    def global_position(self) -> int:
        """The global position in the store."""
    @property
    def added_at(self) -> datetime.datetime:
        """When the message was written (naive UTC)."""

@final
class ClaimedBatch:
    """A partition's rows read under its lock, after its stored position."""

    @property
    def position(self) -> int:
        """The stored position the rows follow (-1 for none)."""
    @property
    def rows(self) -> list[BatchRow]:
        """The rows, in position order."""

@final
class PartitionState:
    """A partition's highest position and the subscription's stored position in it."""

    @property
    def partition(self) -> int:
        """The partition."""
    @property
    def max_position(self) -> int:
        """Its highest position."""
    @property
    def position(self) -> int:
        """The stored position (-1 if none, or without a state table)."""

@final
class SubscriptionSession:
    """A subscription's connection: partition locks, batches, acknowledgements."""

    def __new__(
        cls,
        dsn: str,
        store: str,
        stream: str,
        name: str,
        state_table: str | None = None,
        synchronous_commit: bool = False,
    ) -> SubscriptionSession: ...
    @property
    def closed(self) -> bool:
        """True once closed, or when the server ended the session."""
    def check(self) -> None:
        """Raise if the connection is gone; never blocks."""
    def flush(self) -> None:
        """Wait until everything sent is done."""
    def try_lock(self, key: int) -> bool:
        """Try the advisory lock `key`."""
    def unlock(self, key: int) -> None:
        """Release the advisory lock `key` (does not wait)."""
    def claim(self, partition: int, key: int | None, count: int) -> ClaimedBatch | None:
        """Lock and read the stored position and next rows; None if locked elsewhere."""
    def claim_ahead(self, partition: int, key: int, count: int) -> None:
        """Send a claim now, read in the background; `take_ahead` returns it."""
    def take_ahead(self) -> ClaimedBatch | None:
        """The claim sent ahead, as `claim` returns it; None if locked elsewhere."""
    def read_after(
        self, partition: int, key: int | None, after: int, count: int
    ) -> ClaimedBatch | None:
        """Lock and read the rows after `after`; None if locked elsewhere."""
    def ack(self, partition: int, position: int) -> None:
        """Store a position (never backwards; does not wait)."""
    def stored_position(self, partition: int) -> int:
        """The committed position of `partition` (-1 if none)."""
    def partitions(self) -> list[PartitionState]:
        """Partitions behind their stored position (without a state table: all, and -1)."""
    def close(self) -> None:
        """Close the connection, releasing its locks."""
