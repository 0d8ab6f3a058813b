"""The live runtime: where a notification is turned into a projector (or handler) pass.

The `Executor` and `depeche-rs project` both run on a `LiveRuntime`, on the thread that
calls its `run()`. It LISTENs on its targets' channels over one connection; hands each
notification to the targets interested in it, which makes them pending; makes every target
pending every `poll_interval` seconds from `run()` on (the safety net for lost
notifications, depeche-db's `stimulation_interval`); reconnects a lost connection with
exponential backoff, then makes every target pending (notifications sent meanwhile are
lost); and runs a pass of each pending target that is due through its owner's `run_pass`,
which returns when the target wants its next pass (None: when notified or polled; a delay
in seconds: 0 for more work now, a backoff after an error). The `Executor`'s pass queues
the handler on a worker thread (where `StreamProjector.run()` projects); the command
line's runs the stream's batches in place (`StreamProjector.project()`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar

import psycopg
from psycopg import sql

from ..tools._pg_notification_listener import to_pg_notification

# The longest wait between two looks at the stop flag.
_WAIT_CHUNK_S = 0.25


class Target(Protocol):
    """What notifications are dispatched to: the first half of `RunOnNotification`."""

    @property
    def notification_channel(self) -> str: ...
    def interested_in_notification(self, notification: dict[str, Any]) -> bool: ...
    def take_notification_hint(self, notification: dict[str, Any]) -> None: ...


T = TypeVar("T", bound=Target)


# By hand, not tenacity/backoff: they wrap a blocking call in a retry loop, while the runtime
# only needs the next delay, to schedule a retry as one deadline among others.
class Backoff:
    """Exponential backoff with jitter: `initial`, twice that, ... up to `maximum`."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempts = 0

    def next_delay(self) -> float:
        """The pause before the next attempt."""
        base = min(self.maximum, self.initial * 2**self.attempts)
        self.attempts += 1
        # +-20 %, so that processes cut off together do not reconnect in lockstep.
        return float(base * random.uniform(0.8, 1.2))

    def reset(self) -> None:
        """Back to the first delay after a success."""
        self.attempts = 0


class ListenConnection:
    """One autocommit connection that LISTENs on `channels` (its owner may query on it)."""

    def __init__(self, dsn: str, channels: Iterable[str], application_name: str) -> None:
        self.dsn = dsn
        self.channels = sorted(set(channels))
        self.name = application_name
        self.backend_pid: int | None = None
        self._conn: psycopg.Connection[Any] | None = None

    @property
    def up(self) -> bool:
        """True while the connection is open (as far as we know)."""
        return self._conn is not None and not self._conn.closed

    @property
    def connection(self) -> psycopg.Connection[Any]:
        """The open connection (raises `psycopg.OperationalError` when there is none)."""
        if self._conn is None or self._conn.closed:
            raise psycopg.OperationalError("the LISTEN connection is closed")
        return self._conn

    def connect(self) -> None:
        """Open the connection and LISTEN (raises `psycopg.Error`)."""
        self.close()
        conn = psycopg.connect(
            self.dsn,
            autocommit=True,
            application_name=self.name,
            # libpq keepalives, so that a peer that vanished without a RST is noticed too.
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
        try:
            # The server's side of the same: a vanished host must not hold the session's
            # locks until the kernel's default keepalive (2 hours) gives up.
            conn.execute(
                "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; "
                "SET tcp_keepalives_count = 3"
            )
            for channel in self.channels:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            conn.close()
            raise
        self._conn, self.backend_pid = conn, conn.info.backend_pid

    def close(self) -> None:
        """Close the connection; its session's locks are released by the server."""
        conn, self._conn, self.backend_pid = self._conn, None, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass


class LiveRuntime(Generic[T]):
    """Listen, dispatch, poll, back off; run passes of pending targets (see the module).

    `connection` is connected by `run()` unless it is up. `poll_interval`: zero, negative
    or None, never. Hooks: `tick()` once per turn, before the passes, returns the monotonic
    time it wants the next turn by (or None); `on_lost(error, seconds until the next
    attempt)`; `on_reconnected(seconds it was down)`.
    """

    def __init__(
        self,
        connection: ListenConnection,
        targets: Iterable[T],
        run_pass: Callable[[T], float | None],
        poll_interval: float | None,
        backoff: Backoff | None = None,
        tick: Callable[[], float | None] | None = None,
        on_lost: Callable[[BaseException, float], None] | None = None,
        on_reconnected: Callable[[float], None] | None = None,
    ) -> None:
        self.connection = connection
        self.targets = list(targets)
        self._run_pass = run_pass
        self.poll_interval = poll_interval if poll_interval and poll_interval > 0 else None
        self._backoff = backoff or Backoff()
        self._tick = tick
        self._on_lost = on_lost
        self._on_reconnected = on_reconnected
        # id(target) -> monotonic time its pass is due; present while it is pending.
        self._due: dict[int, float] = {}
        self._next_poll = float("inf")
        self._retry_at = 0.0
        self._lost_since: float | None = None
        self._stopping = False

    def stop(self) -> None:
        """Make `run()` return after the pass in progress (safe in a signal handler)."""
        self._stopping = True

    def wake(self, target: T) -> None:
        """Make `target` pending, due at once (even if it was waiting out a backoff)."""
        self._due[id(target)] = 0.0

    def wake_all(self) -> None:
        """Make every target pending, keeping the delays of those already pending."""
        for target in self.targets:
            self._due.setdefault(id(target), 0.0)

    def connection_lost(self, exc: BaseException) -> None:
        """Close the connection; `run()` reconnects after a backoff delay."""
        now = time.monotonic()
        self.connection.close()
        if self._lost_since is None:
            self._lost_since = now
        delay = self._backoff.next_delay()
        self._retry_at = now + delay
        if self._on_lost is not None:
            self._on_lost(exc, delay)

    def run(self) -> None:
        """Run until `stop()` (raises `psycopg.Error` when it cannot connect at start)."""
        if not self.connection.up:
            self.connection.connect()
        if self.poll_interval is not None:
            self.wake_all()
            self._next_poll = time.monotonic() + self.poll_interval
        while not self._stopping:
            if not self.connection.up and time.monotonic() >= self._retry_at:
                self._reconnect()
            wish = self._tick() if self._tick is not None else None
            for target in self.targets:
                if self._stopping:
                    return
                due = self._due.get(id(target))
                if due is not None and due <= time.monotonic():
                    del self._due[id(target)]
                    again = self._run_pass(target)
                    if again is not None:
                        self._due[id(target)] = time.monotonic() + again
            if not self._stopping:
                self._wait(wish)

    def _wait(self, wish: float | None) -> None:
        deadlines = [self._next_poll, *self._due.values()]
        if wish is not None:
            deadlines.append(wish)
        if not self.connection.up:
            deadlines.append(self._retry_at)
        timeout = min(_WAIT_CHUNK_S, max(0.0, min(deadlines) - time.monotonic()))
        if self.connection.up:
            try:
                conn = self.connection.connection
                # Return at the first notification; take what else is queued with it.
                notifies = list(conn.notifies(timeout=timeout, stop_after=1))
                notifies += conn.notifies(timeout=0) if notifies else []
            except psycopg.Error as exc:
                self.connection_lost(exc)
            else:
                self._dispatch(notifies)
        elif timeout > 0:
            time.sleep(timeout)
        if self.poll_interval is not None and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.poll_interval
            self.wake_all()

    def _dispatch(self, notifies: list[psycopg.Notify]) -> None:
        for notify in notifies:
            payload = to_pg_notification(notify, ignore_payload=False).payload
            for target in self.targets:
                if target.notification_channel == notify.channel and (
                    target.interested_in_notification(payload)
                ):
                    target.take_notification_hint(payload)
                    self._due.setdefault(id(target), 0.0)

    def _reconnect(self) -> None:
        try:
            self.connection.connect()
        except psycopg.Error as exc:
            self.connection_lost(exc)
            return
        down = time.monotonic() - (self._lost_since or time.monotonic())
        self._lost_since = None
        self._backoff.reset()
        # Notifications sent while we were away are lost: every target gets a pass.
        self.wake_all()
        if self._on_reconnected is not None:
            self._on_reconnected(down)
