"""The Executor calls a handler exactly when a notification on its channel interests it
and on its stimulation interval, as depeche-db's does: nothing at start without
stimulation, nothing periodic with an interval of zero or None."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from depeche_rs import Executor, RunOnNotificationResult


class CountingHandler:
    """Records each run and hint; interested only in payloads `wanted` accepts."""

    def __init__(self, channel: str, wanted: Any = None) -> None:
        self.channel = channel
        self.wanted = wanted
        self.calls = 0
        self.hints: list[dict[str, Any]] = []

    @property
    def notification_channel(self) -> str:
        return self.channel

    def interested_in_notification(self, notification: dict[str, Any]) -> bool:
        return self.wanted is None or bool(self.wanted(notification))

    def take_notification_hint(self, notification: dict[str, Any]) -> None:
        self.hints.append(notification)

    def run(self, budget: Any = None) -> RunOnNotificationResult:
        self.calls += 1
        return RunOnNotificationResult.DONE_FOR_NOW

    def stop(self) -> None:
        pass


def _notify(dsn: str, channel: str, *messages: str) -> None:
    with psycopg.connect(dsn) as conn:
        for message in messages:
            conn.execute("SELECT pg_notify(%s, %s)", (channel, json.dumps({"message": message})))
        conn.commit()


def _wait_listening(executor: Executor) -> None:
    deadline = time.monotonic() + 10
    while executor.listener is None or executor.listener.backend_pid is None:
        assert time.monotonic() < deadline, "the executor never listened"
        time.sleep(0.01)


@pytest.fixture()
def running(dsn: str, suffix: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Start an executor with `stimulation_interval` from the test's parameter."""
    interval = request.param
    executor = Executor(dsn, stimulation_interval=interval, disable_signals=True)
    handler = CountingHandler(f"chan_{suffix}", wanted=None)
    executor.register(handler)  # type: ignore[arg-type]
    thread = threading.Thread(target=executor.run)
    thread.start()
    try:
        _wait_listening(executor)
        yield executor, handler
    finally:
        executor.stop()
        thread.join(10)
    assert not thread.is_alive()


@pytest.mark.parametrize("running", [0, -1, None], indirect=True)
def test_no_stimulation_runs_nothing_without_notifications(running: Any) -> None:
    _, handler = running
    time.sleep(1.0)
    assert handler.calls == 0


@pytest.mark.parametrize("running", [0, None], indirect=True)
def test_each_interesting_notification_runs_the_handler_once(
    running: Any, dsn: str, suffix: str
) -> None:
    _, handler = running
    _notify(dsn, f"chan_{suffix}", "a")
    time.sleep(0.5)
    assert handler.calls == 1
    assert handler.hints == [{"message": "a"}]
    _notify(dsn, f"chan_{suffix}", "b")
    time.sleep(0.5)
    assert handler.calls == 2
    time.sleep(0.5)
    assert handler.calls == 2


@pytest.mark.parametrize("running", [20.0], indirect=True)
def test_stimulation_runs_each_handler_at_start_then_only_per_interval(
    running: Any, dsn: str, suffix: str
) -> None:
    _, handler = running
    time.sleep(0.5)
    assert handler.calls == 1
    _notify(dsn, f"chan_{suffix}", "a")
    time.sleep(0.5)
    assert handler.calls == 2


@pytest.mark.parametrize("running", [0.1], indirect=True)
def test_short_stimulation_interval_runs_periodically(running: Any) -> None:
    _, handler = running
    before = handler.calls
    time.sleep(0.5)
    assert 3 <= handler.calls - before <= 7


def test_uninteresting_notifications_run_nothing(dsn: str, suffix: str) -> None:
    executor = Executor(dsn, stimulation_interval=0, disable_signals=True)
    handler = CountingHandler(f"chan_{suffix}", wanted=lambda n: n.get("message") == "yes")
    executor.register(handler)  # type: ignore[arg-type]
    thread = threading.Thread(target=executor.run)
    thread.start()
    try:
        _wait_listening(executor)
        _notify(dsn, f"chan_{suffix}", "no", "no")
        time.sleep(0.5)
        assert (handler.calls, handler.hints) == (0, [])
        _notify(dsn, f"chan_{suffix}", "no", "yes")
        time.sleep(0.5)
        assert (handler.calls, handler.hints) == (1, [{"message": "yes"}])
    finally:
        executor.stop()
        thread.join(10)
    assert not thread.is_alive()
