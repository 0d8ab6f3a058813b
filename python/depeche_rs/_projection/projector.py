"""The stream projector: a thin Python shell over the Rust engine's batch loop.

It runs passes; when they run is the live runtime's business (`_runtime/live.py`): the
`Executor` and `depeche-rs project` drive every projector through it.
"""

from __future__ import annotations

import datetime as _dt
import json as _json
import re as _re
import threading as _threading
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar

from .. import _names
from .._exceptions import PartitionerError, PoisonMessageError
from .._interfaces import (
    AggregatedStreamView,
    MessagePartitioner,
    MessageProtocol,
    RunOnNotificationResult,
    StoredMessage,
    TimeBudget,
    stored_message,
)
from .._native import Projector as NativeProjector
from .._native import ResolveRow
from .._timings import Timings
from ..tools._partitioners import StreamHashPartitioner, StreamNamePartitioner

E = TypeVar("E", bound=MessageProtocol)

DEFAULT_BATCH_SIZE = 1000
_MAX_PARTITION = 2**31 - 1

# The engine's per-batch callback: the rows it needs Python for and whether partitions
# are needed -> (partition, time) each.
Resolve = Callable[[list[ResolveRow], bool], list[tuple[int | None, _dt.datetime]]]


class FullUpdateResult(NamedTuple):
    """What `StreamProjector.update_full` did."""

    n_updated_messages: int
    more_messages_available: bool


class ProjectionResult(NamedTuple):
    """What `StreamProjector.project` did; `locked`: another projector was inside a batch
    of the stream, so nothing was done."""

    n_updated_messages: int
    more_messages_available: bool
    locked: bool


def like_to_regex(wildcard: str) -> _re.Pattern[str]:
    """Compile a LIKE pattern (`%`, `_`, backslash escapes) into an equivalent regex."""
    parts: list[str] = []
    chars = iter(wildcard)
    for ch in chars:
        if ch == "\\":
            parts.append(_re.escape(next(chars, "\\")))
        elif ch == "%":
            parts.append(".*")
        elif ch == "_":
            parts.append(".")
        else:
            parts.append(_re.escape(ch))
    return _re.compile("".join(parts), _re.DOTALL)


def builtin_partitioner(partitioner: Any) -> tuple[str, int | None] | None:
    """The engine's name for a partitioner it can run in Rust, or None.

    Both our and depeche-db's `StreamNamePartitioner` qualify, as long as a subclass did
    not override `get_partition`.
    """
    cls = type(partitioner)
    if cls.get_partition is StreamNamePartitioner.get_partition:
        return ("stream_name", None)
    if cls.get_partition is StreamHashPartitioner.get_partition:
        return ("hash_mod", partitioner.partitions)
    if cls.__module__.startswith("depeche_db.") and cls.__name__ == "StreamNamePartitioner":
        return ("stream_name", None)
    return None


class StreamProjector(Generic[E]):
    """Keeps an aggregated stream up to date with its origin streams.

    Updates are locked in PostgreSQL, so running projectors in several processes or hosts
    is fine: one projects, the others return at once. Every batch is one transaction;
    killing a projector at any moment leaves whole batches or nothing.

    Implements: `RunOnNotification`.
    """

    def __init__(
        self,
        stream: AggregatedStreamView[E],
        partitioner: MessagePartitioner[E],
        stream_wildcards: list[str],
        batch_size: int | None = None,
        lookback_for_gaps_hours: int | None = None,
    ) -> None:
        if batch_size is not None and (
            not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
        ):
            raise ValueError(f"update_batch_size must be a positive int, got {batch_size!r}")
        self.stream = stream
        self.partitioner = partitioner
        self.stream_wildcards = list(stream_wildcards)
        self.stream_regexes = [like_to_regex(w) for w in self.stream_wildcards]
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE
        self.lookback_for_gaps_hours = lookback_for_gaps_hours
        self._builtin = builtin_partitioner(partitioner)
        self._lock = _threading.Lock()
        self._native: NativeProjector | None = None
        self.timings = Timings(enabled=False)
        stream.store._connection_owners.add(self.close)

    @property
    def notification_channel(self) -> str:
        """The channel this projector listens on: the message store's."""
        return self.stream.store.notification_channel

    def interested_in_notification(self, notification: dict[str, Any]) -> bool:
        """True when the notified stream matches one of the wildcards."""
        stream = notification.get("stream")
        return isinstance(stream, str) and any(r.fullmatch(stream) for r in self.stream_regexes)

    def take_notification_hint(self, notification: dict[str, Any]) -> None:
        """Nothing to take: the projector always reads from its cursor."""

    def run(self, budget: TimeBudget | None = None) -> RunOnNotificationResult:
        """Run the projector once (until caught up or the budget is over)."""
        result = self.update_full(budget=budget)
        if budget is not None and result.more_messages_available and budget.over_budget():
            return RunOnNotificationResult.WORK_REMAINING
        return RunOnNotificationResult.DONE_FOR_NOW

    def stop(self) -> None:
        """No-op: `run` returns when caught up or over budget."""

    def update_full(self, budget: TimeBudget | None = None) -> FullUpdateResult:
        """Project everything written so far (or until the budget is over).

        Returns `(n_updated_messages, more_messages_available)`. When another projector
        holds the stream's lock, returns `(0, False)` at once.
        """
        with self.timings.span("update_full"):
            return FullUpdateResult(*self.project(budget=budget)[:2])

    def update_batch(self) -> FullUpdateResult:
        """Project at most one batch."""
        with self.timings.span("update_batch"):
            return FullUpdateResult(*self.project(max_batches=1)[:2])

    def project(
        self,
        budget: TimeBudget | None = None,
        max_batches: int | None = None,
        resolve: Resolve | None = None,
    ) -> ProjectionResult:
        """Internal, behind `update_full`, `update_batch` and `depeche-rs project`: run
        batches until caught up, over `budget` or `max_batches` done. `resolve` replaces
        `resolve_rows` as the engine's callback (the command line's wraps it)."""
        with self._lock:
            native = self._get_native()
            found = native.run(resolve or self._timed_resolve, budget, max_batches)
        return ProjectionResult(found.projected, found.more, found.locked)

    def close(self) -> None:
        """Close the projector's connection (reopened on the next update)."""
        with self._lock:
            if self._native is not None:
                self._native.close()

    def _get_native(self) -> NativeProjector:
        if self._native is None:
            kind, modulus = self._builtin if self._builtin else (None, None)
            self._native = NativeProjector(
                self.stream.store.dsn,
                self.stream.store.name,
                self.stream.name,
                self.stream_wildcards,
                self.batch_size,
                kind,
                modulus,
            )
        return self._native

    def _timed_resolve(
        self, rows: list[ResolveRow], need_partition: bool
    ) -> list[tuple[int | None, _dt.datetime]]:
        with self.timings.span("resolve"):
            return self.resolve_rows(rows, need_partition)

    def resolve_rows(
        self, rows: list[ResolveRow], need_partition: bool
    ) -> list[tuple[int | None, _dt.datetime]]:
        """Internal: the engine's per-batch callback (`Resolve`). Partition (when
        `need_partition`) and message time of each row, by the store's serializer and the
        partitioner; a message that cannot be read raises `PoisonMessageError`."""
        serializer = self.stream.store._serializer
        out: list[tuple[int | None, _dt.datetime]] = []
        for row in rows:
            try:
                # Rows come here only when their body was read (see `ResolveRow.message`).
                message = serializer.deserialize(_json.loads(row.message))  # type: ignore[arg-type]
            except Exception as exc:
                raise self._poison("cannot be deserialized", exc, row) from exc
            partition = self._partition(stored_message(row, message)) if need_partition else None
            occurred_at = row.occurred_at
            if occurred_at is None:
                try:
                    occurred_at = message.get_message_time()
                    if occurred_at.tzinfo is not None:
                        occurred_at = occurred_at.astimezone(_dt.timezone.utc).replace(tzinfo=None)
                except Exception as exc:
                    what = "has no message time (its get_message_time() raised)"
                    raise self._poison(what, exc, row) from exc
            out.append((partition, occurred_at))
        return out

    def _partition(self, stored: StoredMessage[E]) -> int:
        """The partitioner's number for `stored`, or `PartitionerError`."""
        try:
            partition = self.partitioner.get_partition(stored)
        except Exception as exc:
            raise self._partitioner_error(stored, f"raised {exc!r} on") from exc
        if not isinstance(partition, int) or isinstance(partition, bool):
            rule = "it must return an int from 0 upwards; "
            raise self._partitioner_error(stored, f"returned {partition!r} for", rule)
        if partition < 0 or partition > _MAX_PARTITION:
            rule = f"partitions must be from 0 to {_MAX_PARTITION}; "
            raise self._partitioner_error(stored, f"returned {partition} for", rule)
        return partition

    def _partitioner_error(
        self, stored: StoredMessage[E], what: str, rule: str = ""
    ) -> PartitionerError:
        return PartitionerError(
            f"partitioner {type(self.partitioner).__name__} {what} message {stored.message_id} "
            f"of stream {stored.stream!r}; {rule}nothing was projected",
            stream=stored.stream,
            message_id=stored.message_id,
        )

    def _poison(self, what: str, exc: Exception, row: ResolveRow) -> PoisonMessageError:
        return poison_message(self.stream.store.name, row, f"{what}: {exc!r}")


def poison_message(store: str, row: ResolveRow, why: str) -> PoisonMessageError:
    """The error for the message of `row` that cannot be projected, `why`: what it is,
    and how the operator unblocks the projector."""
    message_id = row.message_id
    return PoisonMessageError(
        f"message {message_id} of store {store!r}, stream {row.stream!r}, version "
        f"{row.version}, global position {row.global_position} {why}. Its batch was not "
        "projected and the projector stops at it until it is fixed: correct its body, record "
        f"its time (UPDATE {_names.message_table(store)} SET occurred_at = '<timestamptz>' "
        f"WHERE message_id = '{message_id}'), or delete it",
        store=store,
        stream=row.stream,
        version=row.version,
        global_position=row.global_position,
        message_id=message_id,
    )
