"""One live runtime: `depeche-rs project` and the `Executor` turn a notification into a
projector pass through the same `LiveRuntime` (depeche_rs/_runtime/live.py)."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from depeche_rs import AggregatedStream, Executor, MessageStore
from depeche_rs._cli import _catalog
from depeche_rs._cli._config import ProjectSettings, StreamSpec, parse_partitioner
from depeche_rs._cli._control import ControlConnection
from depeche_rs._cli._logging import Console
from depeche_rs._cli._loop import ProjectedStream, ProjectLoop
from depeche_rs._cli._metrics import ProjectorMetrics
from depeche_rs._cli._signals import StopSignal
from depeche_rs._runtime.live import LiveRuntime
from depeche_rs.tools import StreamNamePartitioner

from ._helpers import check_invariants
from ._models import AnyEvent, Deposited
from .test_cli_harness import forget_registrations

Store = MessageStore[AnyEvent]
# Far longer than any wait below: a pass within the wait can only come from a notification.
_POLL_S = 3600.0


def _until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _count(engine: sa.Engine, agg: str) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(f"SELECT count(*) FROM depeche_stream_{agg}").scalar_one())


@pytest.fixture()
def dispatched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[LiveRuntime[Any], list[str]]]:
    """Every batch of notifications a `LiveRuntime` dispatches, with the runtime."""
    seen: list[tuple[LiveRuntime[Any], list[str]]] = []
    original = LiveRuntime._dispatch

    def dispatch(runtime: LiveRuntime[Any], notifies: list[psycopg.Notify]) -> None:
        if notifies:
            seen.append((runtime, [n.channel for n in notifies]))
        original(runtime, notifies)

    monkeypatch.setattr(LiveRuntime, "_dispatch", dispatch)
    return seen


@pytest.fixture()
def stream(store: Store, stream_name: str, dsn: str) -> Iterator[AggregatedStream[AnyEvent]]:
    yield store.aggregated_stream(stream_name, StreamNamePartitioner(), ["acc-%"])
    forget_registrations(dsn, stream_name)


def _project_loop(dsn: str, stream: AggregatedStream[AnyEvent]) -> tuple[ProjectLoop, StopSignal]:
    """`depeche-rs project`'s loop for `stream`, set up as `run_project` does."""
    spec = StreamSpec(
        store=stream.store.name,
        stream=stream.name,
        wildcards=("acc-%",),
        partitioner=parse_partitioner("stream-hash"),
        batch_size=100,
    )
    settings = ProjectSettings(
        dsn=dsn,
        streams=(spec,),
        poll_interval=_POLL_S,
        stop_timeout=3.0,
        progress_interval=10.0,
        log_format="json",
        log_level="info",
        metrics_port=None,
        metrics_host="127.0.0.1",
        once=False,
    )
    projector = stream.projector
    projected = ProjectedStream(spec=spec, projector=projector, resolve=projector.resolve_rows)
    control = ControlConnection(dsn, [projected.notification_channel])
    control.connect()
    name = control.name
    _catalog.register(
        control.connection, stream.name, spec.store, spec.wildcards, "hash", 100, name
    )
    stop = StopSignal(settings.stop_timeout)
    loop = ProjectLoop(
        settings, [projected], control, ProjectorMetrics(), Console(io.StringIO()), stop
    )
    return loop, stop


def test_the_cli_and_the_executor_project_a_notified_message_through_one_runtime(
    dsn: str,
    store: Store,
    stream: AggregatedStream[AnyEvent],
    engine: sa.Engine,
    dispatched: list[tuple[LiveRuntime[Any], list[str]]],
) -> None:
    channel = store.notification_channel
    store.write("acc-1", Deposited(account=1, amount=1))

    # `depeche-rs project`: the first pass (at start) catches up, then only a notification
    # can bring the next message in before the hour-long poll.
    loop, stop = _project_loop(dsn, stream)
    assert type(loop.runtime) is LiveRuntime
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(loop.run()))
    thread.start()
    try:
        [projected] = loop.streams
        _until(lambda: projected.caught_up)
        assert _count(engine, stream.name) == 1
        store.write("acc-2", Deposited(account=2, amount=2))
        _until(lambda: _count(engine, stream.name) == 2)
    finally:
        stop.request("SIGTERM")
        thread.join(10)
        loop.control.close()
    assert not thread.is_alive() and status == [0]
    cli_runtimes = [r for r, channels in dispatched if channel in channels]
    assert cli_runtimes and all(r is loop.runtime for r in cli_runtimes)
    assert cli_runtimes[0].targets == [projected]

    # The Executor, without stimulation: again only the notification wakes the projector.
    dispatched.clear()
    executor = Executor(dsn, stimulation_interval=0, disable_signals=True)
    executor.register(stream.projector)
    thread = threading.Thread(target=executor.run)
    thread.start()
    try:
        _until(lambda: executor.listener is not None and executor.listener.backend_pid is not None)
        store.write("acc-3", Deposited(account=3, amount=3))
        _until(lambda: _count(engine, stream.name) == 3)
    finally:
        executor.stop()
        thread.join(10)
    assert not thread.is_alive()
    executor_runtimes = [r for r, channels in dispatched if channel in channels]
    assert executor_runtimes and type(executor_runtimes[0]) is LiveRuntime
    assert executor_runtimes[0] is not loop.runtime
    assert executor_runtimes[0].targets == [stream.projector]

    rows = check_invariants(engine, store.name, stream.name, "acc-%")
    assert sorted(r[1] for r in rows) == ["acc-1", "acc-2", "acc-3"]
