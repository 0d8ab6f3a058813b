"""Aggregated streams stuck on an error no retry fixes: what is wrong and what to do.

A batch that fails that way (a message the serializer cannot read, a partitioner that
raises, an unsafe sequence, tables dropped underneath) fails the same way on every retry
until an operator acts. `depeche-rs project` then marks the stream stuck, keeps projecting
its other streams, and retries the stuck one every poll interval: once the operator has
fixed the cause, it goes on by itself.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid as _uuid
from collections.abc import Callable
from typing import Any

import psycopg

from .._exceptions import (
    DatabaseError,
    MissingTablesError,
    PartitionerError,
    PoisonMessageError,
    SerializationError,
    UnsafeSequenceError,
)
from . import _catalog
from ._catalog import Stuck
from ._config import StreamSpec
from ._control import ControlConnection
from ._logging import event
from ._metrics import ProjectorMetrics

# Long enough for a pydantic validation error, short enough for one log line.
_MAX_ERROR_CHARS = 2000


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 3] + "..."
    return text


def _uuid_or_none(value: Any) -> _uuid.UUID | None:
    if value is None:
        return None
    try:
        return value if isinstance(value, _uuid.UUID) else _uuid.UUID(str(value))
    except ValueError:
        return None


def _advice(spec: StreamSpec, exc: BaseException) -> str:
    """What to do, where the error does not say it already."""
    if isinstance(exc, PoisonMessageError):
        builtin = spec.partitioner is not None and spec.partitioner.in_rust
        # Its message says what to do; recording the time is not enough for a Python
        # partitioner, which needs the message itself.
        return "" if builtin else "the partitioner runs in Python: correct its body or delete it"
    if isinstance(exc, UnsafeSequenceError):
        return ""  # its message holds the fix
    if isinstance(exc, PartitionerError):
        return "fix the partitioner (then restart this command) or the message it fails on"
    if isinstance(exc, MissingTablesError):
        return (
            f"restart this command (it creates what is missing) or run `depeche-rs migrate "
            f"--store {spec.store} --stream {spec.stream} --apply`"
        )
    if isinstance(exc, SerializationError):
        return "fix the serializer or the message it fails on"
    if isinstance(exc, DatabaseError):
        return "see the server's error; it is not one a retry fixes"
    return "see the error; the same batch fails on every retry"


def stuck_cause(spec: StreamSpec, exc: BaseException) -> Stuck:
    """What `exc`, raised by a batch of `spec`'s stream, means for the operator."""
    advice = _advice(spec, exc)
    error = _one_line(exc) + (f"; to go on: {advice}" if advice else "")
    if not isinstance(exc, (PoisonMessageError, PartitionerError)):
        return Stuck(kind=type(exc).__name__, error=error)
    # A partitioner error names the message and its stream only.
    return Stuck(
        kind=type(exc).__name__,
        error=error,
        message_id=_uuid_or_none(exc.message_id),
        origin_stream=exc.stream,
        version=getattr(exc, "version", None),
        global_position=getattr(exc, "global_position", None),
    )


def signature(stuck: Stuck) -> tuple[str, str]:
    """What makes two failures the same: the message when one is to blame, else the
    error itself (a new cause is logged again, the same one is not)."""
    return (stuck.kind, stuck.error if stuck.message_id is None else str(stuck.message_id))


def where(stuck: Stuck, store: str | None) -> str:
    """`message 1b4e... of store 'bank', stream 'x-1', version 1, global position 42`, or
    "" when no message is to blame or the error says all that already."""
    if stuck.message_id is None:
        return ""
    position = stuck.global_position
    if str(stuck.message_id) in stuck.error and (
        position is None or f"global position {position}" in stuck.error
    ):
        return ""
    parts = [f"message {stuck.message_id}" + (f" of store {store!r}" if store is not None else "")]
    if stuck.origin_stream is not None:
        parts.append(f"stream {stuck.origin_stream!r}")
    if stuck.version is not None:
        parts.append(f"version {stuck.version}")
    if stuck.global_position is not None:
        parts.append(f"global position {stuck.global_position}")
    return ", ".join(parts)


@dataclasses.dataclass
class StuckState:
    """Where one aggregated stream stands on errors no retry fixes."""

    # Why it is stuck (None: it is not), and since when (monotonic).
    cause: Stuck | None = None
    since: float = 0.0
    recorded: bool = False
    # The registry may say it is stuck (so may a previous process have left it): the
    # first batch that goes through clears that.
    in_registry: bool = True

    @property
    def unsettled(self) -> bool:
        """True while a batch going through has something to clear."""
        return self.cause is not None or self.in_registry


@dataclasses.dataclass
class StuckStreams:
    """Says once that a stream is stuck and when it resumes, and keeps the
    `depeche_rs_stuck` gauge and the registry's record (written on the control
    connection, for `depeche-rs status`) in step. `others`: the process projects other
    streams too."""

    metrics: ProjectorMetrics
    control: ControlConnection
    control_lost: Callable[[BaseException], None]
    poll: float
    others: bool

    def failed(self, spec: StreamSpec, state: StuckState, exc: BaseException) -> None:
        """A batch of `spec`'s stream failed with `exc`, which no retry fixes."""
        self.metrics.stuck.set(spec.stream, 1)
        cause = stuck_cause(spec, exc)
        if state.cause is not None and signature(state.cause) == signature(cause):
            logging.getLogger(__name__).debug("%s: still stuck: %s", spec.stream, exc)
            if not state.recorded:
                self._record(spec, state)
            return
        cause = self._locate(spec, cause)
        if state.cause is None:
            state.since = time.monotonic()
        state.cause = cause
        state.recorded = False
        at = where(cause, spec.store)
        event(
            logging.ERROR,
            "stuck",
            f"{spec.stream}: stuck"
            + (f" at {at}" if at else "")
            + f": {cause.error}; retrying every {self.poll:g} s"
            + ("; the other streams go on" if self.others else ""),
            stream=spec.stream,
            store=spec.store,
            kind=cause.kind,
            origin_stream=cause.origin_stream,
            version=cause.version,
            global_position=cause.global_position,
            message_id=str(cause.message_id) if cause.message_id else None,
            error=cause.error,
        )
        self._record(spec, state)

    def went_through(self, spec: StreamSpec, state: StuckState) -> None:
        """A batch of `spec`'s stream went through: it is not stuck (any more)."""
        if state.cause is not None:
            cause, state.cause = state.cause, None
            self.metrics.stuck.set(spec.stream, 0)
            seconds = time.monotonic() - state.since
            event(
                logging.INFO,
                "resumed",
                f"{spec.stream}: resumed after {seconds:.1f} s stuck"
                + (f" at message {cause.message_id}" if cause.message_id else f" ({cause.kind})"),
                stream=spec.stream,
                seconds=round(seconds, 3),
                kind=cause.kind,
                message_id=str(cause.message_id) if cause.message_id else None,
            )
        if self._registry_write(spec, _catalog.clear_stuck, spec.stream):
            state.in_registry = False

    def _locate(self, spec: StreamSpec, cause: Stuck) -> Stuck:
        """Fill in the origin stream, version and global position of the message to
        blame (a partitioner error names only its id)."""
        if cause.message_id is None or cause.global_position is not None or not self.control.up:
            return cause
        try:
            found = _catalog.locate_message(self.control.connection, spec.store, cause.message_id)
        except psycopg.Error:
            return cause  # only details are at stake; the registry write will tell
        if found is None:
            return cause
        origin, version, position = found
        return dataclasses.replace(
            cause, origin_stream=origin, version=version, global_position=position
        )

    def _record(self, spec: StreamSpec, state: StuckState) -> None:
        assert state.cause is not None
        if self._registry_write(spec, _catalog.mark_stuck, spec.stream, state.cause):
            state.recorded = True
            state.in_registry = True

    def _registry_write(self, spec: StreamSpec, write: Any, *args: Any) -> bool:
        """Run a registry update on the control connection; False when it failed."""
        try:
            write(self.control.connection, *args)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self.control_lost(exc)
            return False
        except psycopg.Error as exc:
            event(
                logging.WARNING,
                "registry_error",
                f"{spec.stream}: could not update the registry ({str(exc).strip()}); "
                "`depeche-rs status` may not show whether the stream is stuck",
                stream=spec.stream,
                error=str(exc).strip(),
            )
            return False
        return True
