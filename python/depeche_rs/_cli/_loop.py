"""`depeche-rs project`'s part of the live runtime: hot-standby election, batches,
progress, metrics, stuck streams, exit statuses.

The runtime (`.._runtime.live.LiveRuntime`, the one the `Executor` runs on too) listens on the
control connection, dispatches notifications to the streams, polls every poll interval,
and reconnects the control connection with backoff; `ProjectLoop` gives it the streams
and its hooks: `_tick` (election, backlog, when to stop) and `_pass` (a stream's batches).

Batches of different streams take turns in slices of `_SLICE_S`, so that one stream's
catch-up does not hold back another's live messages for long. A lost projector
connection is retried with exponential backoff (the server rolls back an interrupted
batch, so nothing is half-written); a lost control connection pauses projecting until it
is back and the lock is taken again. A batch failing with an error that a retry cannot
fix makes its stream stuck (see `_stuck`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import psycopg

from .._exceptions import TRANSIENT_SQLSTATES, DatabaseConnectionError, DatabaseError
from .._projection.projector import Resolve, StreamProjector
from .._runtime.live import Backoff, LiveRuntime
from . import _catalog, _stuck
from ._config import ProjectSettings, StreamSpec
from ._control import ControlConnection
from ._logging import Console, event
from ._metrics import ProjectorMetrics
from ._progress import CatchUpProgress
from ._signals import StopSignal

# How long one stream may run batches before the others get their turn.
_SLICE_S = 0.5
# How often the backlog gauge is recounted (and the progress line's estimate corrected).
_BACKLOG_INTERVAL_S = 30.0


@dataclasses.dataclass(eq=False)
class ProjectedStream:
    """One aggregated stream of the process, and where it stands (a runtime target)."""

    spec: StreamSpec
    projector: StreamProjector[Any]
    resolve: Resolve
    leader: bool = False
    caught_up: bool = False
    finished: bool = False
    next_lock_attempt: float = 0.0
    next_backlog_check: float = 0.0
    lost_since: float | None = None
    standby_holder: str | None = None
    table_locked: bool = False
    progress: CatchUpProgress | None = None
    projected_total: int = 0
    backoff: Backoff = dataclasses.field(default_factory=Backoff)
    stuck: _stuck.StuckState = dataclasses.field(default_factory=_stuck.StuckState)

    @property
    def name(self) -> str:
        """The aggregated stream's name."""
        return self.spec.stream

    @property
    def notification_channel(self) -> str:
        """The store's channel."""
        return self.projector.notification_channel

    def interested_in_notification(self, notification: dict[str, Any]) -> bool:
        """The projector's rule, and a payload naming no stream (sent by hand) too."""
        stream = notification.get("stream")
        return not isinstance(stream, str) or self.projector.interested_in_notification(
            notification
        )

    def take_notification_hint(self, notification: dict[str, Any]) -> None:
        """Nothing to take: the projector reads from its cursor."""


@dataclasses.dataclass(eq=False)
class ProjectLoop:
    """The hooks of one `depeche-rs project` process on its live runtime."""

    settings: ProjectSettings
    streams: list[ProjectedStream]
    control: ControlConnection
    metrics: ProjectorMetrics
    console: Console
    stop: StopSignal

    def __post_init__(self) -> None:
        self.poll = self.settings.poll_interval
        self.status: int | None = None
        self.runtime = LiveRuntime(
            self.control,
            self.streams,
            self._pass,
            self.poll,
            tick=self._tick,
            on_lost=self._control_lost,
            on_reconnected=lambda down: self._reconnected(
                "listen", "the LISTEN/lock connection", down
            ),
        )
        self.stuck_streams = _stuck.StuckStreams(
            self.metrics,
            self.control,
            self.runtime.connection_lost,
            self.poll,
            others=len(self.streams) > 1,
        )

    def run(self) -> int:
        """Project until stopped; returns the exit status."""
        self.runtime.run()
        if self.status is not None:
            return self.status
        event(
            logging.INFO,
            "stopping",
            f"stopping on {self.stop.signal_name}: no batch was in progress or it was "
            "finished whole",
            signal=self.stop.signal_name,
        )
        return 0

    def _tick(self) -> float | None:
        """Once per turn of the runtime: election, backlog; returns when the next lock
        attempt is due."""
        if self._ended() or not self.control.up:
            return None
        now = time.monotonic()
        self._elect(now)
        if self.control.up:
            self._refresh_backlogs(now)
        self._ended()
        return min((s.next_lock_attempt for s in self.streams if not s.leader), default=None)

    def _pass(self, stream: ProjectedStream) -> float | None:
        """The runtime's pass of `stream`: its batches for one slice, when it is active
        (becoming active wakes it)."""
        again = self._work(stream) if stream.leader else None
        self._ended()
        return again

    def _ended(self) -> bool:
        """Stop the runtime on a stop signal, with `--once` when done, or when every
        stream is stuck (setting the exit status)."""
        stuck = [s.name for s in self.streams if s.stuck.cause is not None]
        if self.stop.requested or self.status is not None:
            pass
        elif self.settings.once and all(s.finished for s in self.streams):
            self.status = self._done(stuck)
        elif stuck and len(stuck) == len(self.streams):
            event(
                logging.ERROR,
                "error",
                f"every aggregated stream of this process is stuck ({', '.join(stuck)}); "
                "exiting with status 1 (restarting retries them)",
                stuck=stuck,
            )
            self.status = 1
        else:
            return False
        self.runtime.stop()
        return True

    def _done(self, stuck: list[str]) -> int:
        """`--once`: every stream is caught up, left to another instance, or `stuck`."""
        standing_by = [s.name for s in self.streams if not s.caught_up and s.stuck.cause is None]
        parts = []
        if standing_by:
            parts.append(f"left to another instance: {', '.join(standing_by)}")
        if stuck:
            parts.append(f"stuck: {', '.join(stuck)}")
        text = "caught up" + ("; " + "; ".join(parts) if parts else " everywhere")
        status = 1 if stuck else 0
        event(
            logging.ERROR if stuck else logging.INFO,
            "done",
            f"{text}; exiting (--once) with status {status}",
            standby=standing_by,
            stuck=stuck,
        )
        return status

    # -- hot standby ----------------------------------------------------------------

    def _elect(self, now: float) -> None:
        for stream in self.streams:
            if stream.leader or now < stream.next_lock_attempt:
                continue
            stream.next_lock_attempt = now + self.poll
            try:
                got = self.control.try_lock(stream.name)
                holder = None if got else _catalog.lock_holder(self.control.connection, stream.name)
            except psycopg.Error as exc:
                self.runtime.connection_lost(exc)
                return
            if got:
                self._become_active(stream)
                continue
            described = holder.describe() if holder else "another instance"
            if described != stream.standby_holder:
                stream.standby_holder = described
                event(
                    logging.INFO,
                    "standby",
                    f"{stream.name}: lock held by {described}; standing by, trying again "
                    f"every {self.poll:g} s",
                    stream=stream.name,
                    holder=holder.application_name if holder else None,
                    holder_pid=holder.pid if holder else None,
                )
            if self.settings.once:
                stream.finished = True

    def _become_active(self, stream: ProjectedStream) -> None:
        took_over = stream.standby_holder is not None
        stream.leader = True
        stream.standby_holder = None
        stream.caught_up = False
        self.runtime.wake(stream)
        self.metrics.lock_holder.set(stream.name, 1)
        event(
            logging.INFO,
            "active",
            f"{stream.name}: "
            + ("took over: " if took_over else "")
            + "holding the projector lock, this instance projects",
            stream=stream.name,
            took_over=took_over,
        )
        if stream.progress is not None:
            stream.progress.finish()
            stream.progress = None
        backlog = self._measure_backlog(stream)
        if backlog:
            event(
                logging.INFO,
                "catching_up",
                f"{stream.name}: catching up: {backlog:,} messages to project",
                stream=stream.name,
                backlog=backlog,
            )
            stream.progress = CatchUpProgress(
                stream.name, backlog, self.console, self.settings.progress_interval
            )

    def _refresh_backlogs(self, now: float) -> None:
        for stream in self.streams:
            if now >= stream.next_backlog_check and self.control.up:
                backlog = self._measure_backlog(stream)
                if backlog is not None and stream.progress is not None:
                    stream.progress.remeasured(backlog)

    def _measure_backlog(self, stream: ProjectedStream) -> int | None:
        """Count the backlog into the gauge; None when it could not be counted."""
        stream.next_backlog_check = time.monotonic() + _BACKLOG_INTERVAL_S
        try:
            measured = _catalog.backlog(
                self.control.connection, stream.spec.store, stream.name, stream.spec.wildcards
            )
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self.runtime.connection_lost(exc)
            return None
        except psycopg.Error as exc:
            # Only the gauge and the progress estimate are at stake: say so, carry on.
            event(
                logging.WARNING,
                "backlog_unknown",
                f"{stream.name}: could not count the backlog: {str(exc).strip()}",
                stream=stream.name,
                error=str(exc).strip(),
            )
            return None
        self.metrics.backlog.set(stream.name, measured.messages)
        return measured.messages

    # -- batches --------------------------------------------------------------------

    def _work(self, stream: ProjectedStream) -> float | None:
        """Batches of `stream` for one slice; returns when to go on (None: caught up)."""
        deadline = time.monotonic() + _SLICE_S
        while not self.stop.requested:
            started = time.monotonic()
            try:
                projected, more, locked = stream.projector.project(
                    max_batches=1, resolve=stream.resolve
                )
            except DatabaseConnectionError as exc:
                return self._projector_failed(stream, exc, lost=True)
            except DatabaseError as exc:
                if (exc.sqlstate or "").startswith(TRANSIENT_SQLSTATES):
                    return self._projector_failed(stream, exc, lost=False)
                return self._stuck(stream, exc)
            except Exception as exc:
                # A message the serializer cannot read, a failing partitioner, an unsafe
                # sequence, tables dropped: the same batch would fail again.
                return self._stuck(stream, exc)
            took = time.monotonic() - started
            if stream.lost_since is not None:
                down, stream.lost_since = time.monotonic() - stream.lost_since, None
                self._reconnected(
                    stream.name, f"{stream.name}: the projector", down, stream=stream.name
                )
            stream.backoff.reset()
            if locked:
                return self._table_locked(stream)
            stream.table_locked = False
            if stream.stuck.unsettled:
                self.stuck_streams.went_through(stream.spec, stream.stuck)
                if not stream.leader:
                    return None  # the control connection went down with the lock
            self.metrics.last_batch.set(stream.name, time.time())
            if projected:
                stream.projected_total += projected
                self.metrics.projected.inc(stream.name, projected)
                self.metrics.batch_duration.observe(stream.name, took)
                if stream.progress is not None:
                    stream.progress.advance(projected)
            if not more:
                self.metrics.backlog.set(stream.name, 0)
                if not stream.caught_up:
                    self._caught_up(stream)
                return None
            if time.monotonic() >= deadline:
                return 0.0
        return 0.0

    def _caught_up(self, stream: ProjectedStream) -> None:
        stream.caught_up = True
        live = (
            ""
            if self.settings.once
            else f"; live on NOTIFY {stream.notification_channel}, polling every {self.poll:g} s"
        )
        progress, stream.progress = stream.progress, None
        text = "caught up, nothing to project"
        fields: dict[str, float] = {"projected": 0}
        if progress is not None:
            progress.finish()
            seconds = progress.elapsed
            rate = progress.done / seconds if seconds > 0 else 0.0
            text = (
                f"caught up: projected {progress.done:,} messages in {seconds:.2f} s "
                f"({rate:,.0f} msg/s)"
            )
            fields = {
                "projected": progress.done,
                "seconds": round(seconds, 3),
                "rate": round(rate, 1),
            }
        event(
            logging.INFO, "caught_up", f"{stream.name}: {text}{live}", stream=stream.name, **fields
        )
        if self.settings.once:
            stream.finished = True

    def _table_locked(self, stream: ProjectedStream) -> float:
        # Our own instances coordinate through the hot-standby lock; this is someone
        # else (a library projector, depeche-db) inside a batch right now.
        if not stream.table_locked:
            stream.table_locked = True
            event(
                logging.INFO,
                "locked",
                f"{stream.name}: another projector (not a depeche-rs project instance) holds "
                f"the aggregated table's lock; trying again in {self.poll:g} s",
                stream=stream.name,
            )
        return self.poll

    def _projector_failed(self, stream: ProjectedStream, exc: DatabaseError, lost: bool) -> float:
        delay = stream.backoff.next_delay()
        if lost and stream.lost_since is None:
            stream.lost_since = time.monotonic()
        what = "lost its database connection" if lost else "hit a transient error"
        event(
            logging.WARNING,
            "connection_lost" if lost else "retry",
            f"{stream.name}: the projector {what} ({exc}); no batch is half-written "
            f"(PostgreSQL rolls back an interrupted one); retrying in {delay:.1f} s",
            stream=stream.name,
            error=str(exc),
            sqlstate=exc.sqlstate,
            retry_in=round(delay, 2),
        )
        return delay

    def _stuck(self, stream: ProjectedStream, exc: Exception) -> float:
        """The batch failed in a way no retry fixes: retry it every poll interval (the
        operator may fix the cause meanwhile) while the other streams go on."""
        if self.settings.once:
            stream.finished = True
        if stream.progress is not None:
            stream.progress.finish()
        self.stuck_streams.failed(stream.spec, stream.stuck, exc)
        return self.poll

    def _reconnected(self, connection: str, what: str, down: float, **fields: str) -> None:
        self.metrics.reconnects.inc(connection)
        event(
            logging.INFO,
            "reconnected",
            f"{what} reconnected after {down:.1f} s",
            **fields,
            connection=connection,
            seconds=round(down, 3),
        )

    # -- the control connection (the runtime reconnects it) --------------------------

    def _control_lost(self, exc: BaseException, delay: float) -> None:
        paused = [s.name for s in self.streams if s.leader]
        for stream in self.streams:
            stream.leader = False
            stream.next_lock_attempt = 0.0
            self.metrics.lock_holder.set(stream.name, 0)
            # Stuck as the active instance only: a standby's series must not add up.
            self.metrics.stuck.set(stream.name, 0)
        pause = (
            f"; projecting {', '.join(paused)} is paused until it is back (a standby may take "
            "over meanwhile)"
            if paused
            else ""
        )
        event(
            logging.WARNING,
            "connection_lost",
            f"lost the LISTEN/lock connection ({str(exc).strip()}){pause}; reconnecting in "
            f"{delay:.1f} s",
            connection="listen",
            error=str(exc).strip(),
            retry_in=round(delay, 2),
        )
