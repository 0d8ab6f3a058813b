"""The parts that live under depeche-db's module paths: the asyncio listener and the
experimental ThreadedExecutor, against a real server."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import psycopg

from depeche_rs import FixedTimeBudget, RunOnNotificationResult
from depeche_rs.experimental.threaded_executor import ThreadedExecutor
from depeche_rs.tools import PgNotification
from depeche_rs.tools.async_pg_notification_listener import AsyncPgNotificationListener


def _notify(dsn: str, channel: str, payloads: list[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for payload in payloads:
            conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


def test_async_listener_yields_every_notification_in_order(dsn: str) -> None:
    channel = f"c_{uuid.uuid4().hex[:12]}"

    async def scenario() -> list[PgNotification]:
        got: list[PgNotification] = []
        async with AsyncPgNotificationListener(dsn, [channel], select_timeout=0.2) as listener:
            await asyncio.to_thread(_notify, dsn, channel, ['{"n": 1}', '{"n": 2}', "x"])
            async for notification in listener.messages():
                got.append(notification)
                if len(got) == 3:
                    break
        return got

    got = asyncio.run(scenario())
    assert got == [
        PgNotification(channel, {"n": 1}),
        PgNotification(channel, {"n": 2}),
        PgNotification(channel, {}),
    ]


def test_async_listener_timeout_ends_messages_when_quiet(dsn: str) -> None:
    channel = f"c_{uuid.uuid4().hex[:12]}"

    async def scenario() -> tuple[list[PgNotification], float]:
        async with AsyncPgNotificationListener(dsn, [channel], select_timeout=5.0) as listener:
            started = time.monotonic()
            got = [n async for n in listener.messages(timeout=0.3)]
            return got, time.monotonic() - started

    got, took = asyncio.run(scenario())
    assert got == []
    assert took < 3.0


class _Handler:
    def __init__(self, channel: str, fail: bool = False) -> None:
        self.notification_channel = channel
        self.fail = fail
        self.calls: list[FixedTimeBudget] = []
        self.hints: list[dict[str, object]] = []
        self.threads: set[str] = set()

    def interested_in_notification(self, notification: dict[str, object]) -> bool:
        return notification.get("wanted", True) is True

    def take_notification_hint(self, notification: dict[str, object]) -> None:
        self.hints.append(notification)

    def run(self, budget: FixedTimeBudget) -> RunOnNotificationResult:
        self.threads.add(threading.current_thread().name)
        self.calls.append(budget)
        if self.fail:
            raise RuntimeError("handler failed")
        return RunOnNotificationResult.DONE_FOR_NOW

    def stop(self) -> None:
        pass


def _wait_for(predicate: object, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not predicate():  # type: ignore[operator]
        time.sleep(0.02)


def test_threaded_executor_runs_each_handler_on_its_own_thread_on_notifications(
    dsn: str,
) -> None:
    channel = f"c_{uuid.uuid4().hex[:12]}"
    first, second = _Handler(channel), _Handler(channel)
    executor = ThreadedExecutor(dsn, stimulation_interval=0, disable_signals=True)
    executor.register(first)
    executor.register(second)
    thread = threading.Thread(target=executor.run)
    thread.start()
    try:
        _wait_for(lambda: executor.listener is not None and executor.listener.up)
        time.sleep(0.3)
        assert first.calls == [] and second.calls == []  # no stimulation, no notification
        _notify(dsn, channel, ['{"wanted": false}'])
        time.sleep(0.3)
        assert first.calls == [] and first.hints == []
        _notify(dsn, channel, ['{"wanted": true, "n": 1}'])
        _wait_for(lambda: first.calls and second.calls)
    finally:
        executor.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert first.hints == second.hints == [{"wanted": True, "n": 1}]
    assert len(first.calls) == len(second.calls) == 1
    assert first.threads.isdisjoint(second.threads)


def test_threaded_executor_stops_when_a_handler_fails(dsn: str) -> None:
    channel = f"c_{uuid.uuid4().hex[:12]}"
    failing = _Handler(channel, fail=True)
    executor = ThreadedExecutor(dsn, stimulation_interval=0.1, disable_signals=True)
    executor.register(failing)
    thread = threading.Thread(target=executor.run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    assert executor.keep_running is False
    assert len(failing.calls) == 1
    assert [type(e) for e in executor.failed_handlers.values()] == [RuntimeError]
