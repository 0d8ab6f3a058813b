"""The loop of one `depeche-rs project` process: hot-standby election, batches,
notifications, polls, reconnections.

Batches of different streams take turns in slices of `_SLICE_S`, so that one stream's
catch-up does not hold back another's live messages for long. A lost projector
connection is retried with exponential backoff (the server rolls back an interrupted
batch, so nothing is half-written); a lost control connection pauses projecting until it
is back and the lock is taken again. A batch failing with an error that a retry cannot
fix (see `_stuck`) makes its stream stuck: logged once, recorded in the registry for
`status`, retried every poll interval while the other streams go on. The loop ends with
status 1 only when every stream of the process is stuck (or, with `--once`, when one
is).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time

import psycopg

from .. import _native
from .._exceptions import DatabaseConnectionError, DatabaseError
from . import _catalog, _stuck
from ._config import ProjectSettings, StreamSpec
from ._control import Backoff, ControlConnection
from ._json_messages import Resolve
from ._logging import Console, event
from ._metrics import ProjectorMetrics
from ._progress import CatchUpProgress
from ._signals import StopSignal

# How long one stream may run batches before the others get their turn.
_SLICE_S = 0.5
# The longest wait between two looks at the stop flag.
_WAIT_CHUNK_S = 0.25
# How often the backlog gauge is recounted (and the progress line's estimate corrected).
_BACKLOG_INTERVAL_S = 30.0
# SQLSTATE classes a retry can fix: transaction rollback (serialization failure,
# deadlock), insufficient resources, and a cancelled statement (statement_timeout).
_TRANSIENT_SQLSTATES = ("40", "53", "57014")


@dataclasses.dataclass
class ProjectedStream:
    """One aggregated stream of the process, and where it stands."""

    spec: StreamSpec
    channel: str
    regexes: list[re.Pattern[str]]
    native: _native.Projector
    resolve: Resolve
    leader: bool = False
    pending: bool = True
    caught_up: bool = False
    finished: bool = False
    next_lock_attempt: float = 0.0
    retry_at: float = 0.0
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
    def labels(self) -> tuple[str]:
        """Its metric labels."""
        return (self.spec.stream,)


class ProjectLoop:
    """The loop of one `depeche-rs project` process."""

    def __init__(
        self,
        settings: ProjectSettings,
        streams: list[ProjectedStream],
        control: ControlConnection,
        metrics: ProjectorMetrics,
        console: Console,
        stop: StopSignal,
    ) -> None:
        self.settings = settings
        self.streams = streams
        self.control = control
        self.metrics = metrics
        self.console = console
        self.stop = stop
        self.poll = settings.poll_interval
        self._next_poll = time.monotonic() + self.poll
        self._control_backoff = Backoff()
        self._control_retry_at = 0.0
        self._control_lost_since: float | None = None
        self.stuck_streams = _stuck.StuckStreams(
            metrics, control, self._control_lost, self.poll, others=len(streams) > 1
        )

    # -- the loop -------------------------------------------------------------------

    def run(self) -> int:
        """Project until stopped; returns the exit status."""
        while not self.stop.requested:
            now = time.monotonic()
            if not self.control.up and now >= self._control_retry_at:
                self._reconnect_control()
            if self.control.up:
                self._elect(now)
            if self.control.up:
                self._refresh_backlogs(now)
            for stream in self.streams:
                if self.stop.requested:
                    break
                if stream.leader and stream.pending and time.monotonic() >= stream.retry_at:
                    self._work(stream)
            if self.settings.once and all(s.finished for s in self.streams):
                return self._done()
            stuck = [s.name for s in self.streams if s.stuck.cause is not None]
            if stuck and len(stuck) == len(self.streams):
                event(
                    logging.ERROR,
                    "error",
                    f"every aggregated stream of this process is stuck ({', '.join(stuck)}); "
                    "exiting with status 1 (restarting retries them)",
                    stuck=stuck,
                )
                return 1
            self._wait()
        event(
            logging.INFO,
            "stopping",
            f"stopping on {self.stop.signal_name}: no batch was in progress or it was "
            "finished whole",
            signal=self.stop.signal_name,
        )
        return 0

    def _done(self) -> int:
        """`--once`: every stream is caught up, left to another instance, or stuck."""
        stuck = [s.name for s in self.streams if s.stuck.cause is not None]
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

    def _wait(self) -> None:
        now = time.monotonic()
        ready = [s for s in self.streams if s.leader and s.pending and s.retry_at <= now]
        if ready:
            timeout = 0.0
        else:
            deadlines = [self._next_poll]
            deadlines += [s.retry_at for s in self.streams if s.leader and s.pending]
            deadlines += [s.next_lock_attempt for s in self.streams if not s.leader]
            if not self.control.up:
                deadlines.append(self._control_retry_at)
            timeout = max(0.0, min(deadlines) - now)
        timeout = min(timeout, _WAIT_CHUNK_S)
        if self.control.up:
            try:
                notifies = self.control.wait(timeout)
            except psycopg.Error as exc:
                self._control_lost(exc)
            else:
                self._dispatch(notifies)
        elif timeout > 0:
            time.sleep(timeout)
        if time.monotonic() >= self._next_poll:
            # The safety net: a pass even without a notification (one may have been lost).
            self._next_poll = time.monotonic() + self.poll
            for stream in self.streams:
                stream.pending = True

    def _dispatch(self, notifies: list[psycopg.Notify]) -> None:
        for notify in notifies:
            try:
                origin = json.loads(notify.payload).get("stream")
            except (ValueError, AttributeError):
                origin = None
            for stream in self.streams:
                if stream.channel != notify.channel:
                    continue
                if not isinstance(origin, str) or any(r.fullmatch(origin) for r in stream.regexes):
                    stream.pending = True

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
                self._control_lost(exc)
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
        stream.pending = True
        stream.caught_up = False
        stream.retry_at = 0.0
        self.metrics.lock_holder.set(stream.labels, 1)
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
            self._control_lost(exc)
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
        self.metrics.backlog.set(stream.labels, measured.messages)
        return measured.messages

    # -- batches --------------------------------------------------------------------

    def _work(self, stream: ProjectedStream) -> None:
        deadline = time.monotonic() + _SLICE_S
        while not self.stop.requested:
            started = time.monotonic()
            try:
                projected, more, locked = stream.native.run(stream.resolve, None, 1)
            except DatabaseConnectionError as exc:
                self._projector_failed(stream, exc, lost=True)
                return
            except DatabaseError as exc:
                if (exc.sqlstate or "").startswith(_TRANSIENT_SQLSTATES):
                    self._projector_failed(stream, exc, lost=False)
                    return
                self._stuck(stream, exc)
                return
            except Exception as exc:
                # A message the serializer cannot read, a failing partitioner, an unsafe
                # sequence, tables dropped: the same batch would fail again.
                self._stuck(stream, exc)
                return
            took = time.monotonic() - started
            if stream.lost_since is not None:
                self._reconnected(stream)
            stream.backoff.reset()
            if locked:
                self._table_locked(stream)
                return
            stream.table_locked = False
            if stream.stuck.unsettled:
                self.stuck_streams.went_through(stream.spec, stream.stuck)
                if not stream.leader:
                    return  # the control connection went down with the lock
            self.metrics.last_batch.set(stream.labels, time.time())
            if projected:
                stream.projected_total += projected
                self.metrics.projected.inc(stream.labels, projected)
                self.metrics.batch_duration.observe(stream.labels, took)
                if stream.progress is not None:
                    stream.progress.advance(projected)
            if not more:
                stream.pending = False
                self.metrics.backlog.set(stream.labels, 0)
                if not stream.caught_up:
                    self._caught_up(stream)
                return
            if time.monotonic() >= deadline:
                return

    def _caught_up(self, stream: ProjectedStream) -> None:
        stream.caught_up = True
        live = (
            ""
            if self.settings.once
            else f"; live on NOTIFY {stream.channel}, polling every {self.poll:g} s"
        )
        progress, stream.progress = stream.progress, None
        if progress is None:
            event(
                logging.INFO,
                "caught_up",
                f"{stream.name}: caught up, nothing to project{live}",
                stream=stream.name,
                projected=0,
            )
        else:
            progress.finish()
            seconds = progress.elapsed
            rate = progress.done / seconds if seconds > 0 else 0.0
            event(
                logging.INFO,
                "caught_up",
                f"{stream.name}: caught up: projected {progress.done:,} messages in "
                f"{seconds:.2f} s ({rate:,.0f} msg/s){live}",
                stream=stream.name,
                projected=progress.done,
                seconds=round(seconds, 3),
                rate=round(rate, 1),
            )
        if self.settings.once:
            stream.finished = True

    def _table_locked(self, stream: ProjectedStream) -> None:
        # Our own instances coordinate through the hot-standby lock; this is someone
        # else (a library projector, depeche-db) inside a batch right now.
        stream.retry_at = time.monotonic() + self.poll
        if not stream.table_locked:
            stream.table_locked = True
            event(
                logging.INFO,
                "locked",
                f"{stream.name}: another projector (not a depeche-rs project instance) holds "
                f"the aggregated table's lock; trying again in {self.poll:g} s",
                stream=stream.name,
            )

    def _projector_failed(self, stream: ProjectedStream, exc: DatabaseError, lost: bool) -> None:
        now = time.monotonic()
        delay = stream.backoff.next_delay()
        stream.retry_at = now + delay
        stream.pending = True
        if lost and stream.lost_since is None:
            stream.lost_since = now
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

    def _stuck(self, stream: ProjectedStream, exc: Exception) -> None:
        """The batch failed in a way no retry fixes: retry it every poll interval (the
        operator may fix the cause meanwhile) while the other streams go on."""
        stream.retry_at = time.monotonic() + self.poll
        stream.pending = True
        if self.settings.once:
            stream.finished = True
        if stream.progress is not None:
            stream.progress.finish()
        self.stuck_streams.failed(stream.spec, stream.stuck, exc)

    def _reconnected(self, stream: ProjectedStream) -> None:
        assert stream.lost_since is not None
        down = time.monotonic() - stream.lost_since
        stream.lost_since = None
        self.metrics.reconnects.inc(stream.labels)
        event(
            logging.INFO,
            "reconnected",
            f"{stream.name}: the projector reconnected after {down:.1f} s",
            stream=stream.name,
            connection=stream.name,
            seconds=round(down, 3),
        )

    # -- the control connection -----------------------------------------------------

    def _control_lost(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.control.close()
        paused = [s.name for s in self.streams if s.leader]
        for stream in self.streams:
            stream.leader = False
            stream.next_lock_attempt = 0.0
            self.metrics.lock_holder.set(stream.labels, 0)
            # Stuck as the active instance only: a standby's series must not add up.
            self.metrics.stuck.set(stream.labels, 0)
        if self._control_lost_since is None:
            self._control_lost_since = now
        delay = self._control_backoff.next_delay()
        self._control_retry_at = now + delay
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

    def _reconnect_control(self) -> None:
        try:
            self.control.connect()
        except psycopg.Error as exc:
            self._control_lost(exc)
            return
        down = time.monotonic() - (self._control_lost_since or time.monotonic())
        self._control_lost_since = None
        self._control_backoff.reset()
        self.metrics.reconnects.inc(("listen",))
        event(
            logging.INFO,
            "reconnected",
            f"the LISTEN/lock connection reconnected after {down:.1f} s",
            connection="listen",
            seconds=round(down, 3),
        )
        # Notifications sent while we were away are lost: look at every stream once.
        for stream in self.streams:
            stream.pending = True
