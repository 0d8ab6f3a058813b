"""`depeche-rs demo`: the main job on real PostgreSQL, with figures."""

from __future__ import annotations

import concurrent.futures as _futures
import dataclasses
import datetime as _dt
import time as _time
import uuid as _uuid
from typing import Any

from ._db.connection import redact
from ._interfaces import StoredMessage, SubscriptionMessage
from ._store.message_store import MessageStore
from ._subscriptions.ack import AckStrategy
from ._subscriptions.message_handler import MessageHandlerRegister
from .tools import StreamNamePartitioner


@dataclasses.dataclass
class DemoEvent:
    """A plain message class (no pydantic needed) with depeche-db's protocol."""

    account: int
    amount: int
    event_id: _uuid.UUID = dataclasses.field(default_factory=_uuid.uuid4)
    at: _dt.datetime = dataclasses.field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc))

    def get_message_id(self) -> _uuid.UUID:
        """The message id."""
        return self.event_id

    def get_message_time(self) -> _dt.datetime:
        """When it happened."""
        return self.at


class DemoSerializer:
    """JSON for `DemoEvent`, in depeche-db's style (with `__typename__`)."""

    def serialize(self, message: DemoEvent) -> dict[str, Any]:
        """To a JSON object."""
        return {
            "__typename__": "DemoEvent",
            "account": message.account,
            "amount": message.amount,
            "event_id": str(message.event_id),
            "at": message.at.isoformat(),
        }

    def deserialize(self, message: dict[str, Any]) -> DemoEvent:
        """From a JSON object."""
        return DemoEvent(
            account=message["account"],
            amount=message["amount"],
            event_id=_uuid.UUID(message["event_id"]),
            at=_dt.datetime.fromisoformat(message["at"]),
        )


class AccountPartitioner:
    """A Python partitioner reading a message field (8 partitions)."""

    def get_partition(self, message: StoredMessage[DemoEvent]) -> int:
        """The account number modulo 8."""
        return message.message.account % 8


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f} msg/s" if seconds > 0 else "n/a"


def _write_backlog(store: Any, messages: int, streams: int) -> tuple[int, int, int]:
    per_stream = max(1, messages // streams)
    batches = [
        (account, min(per_stream, messages - start))
        for account, start in enumerate(range(0, messages, per_stream))
    ]

    def write(account: int, n: int) -> None:
        store.write_many(
            f"account-{account}", [DemoEvent(account, i) for i in range(n)], expected_version=0
        )

    # Four writers at once: each commit waits for the disk, so they overlap well.
    with _futures.ThreadPoolExecutor(max_workers=4) as pool:
        for future in [pool.submit(write, a, n) for a, n in batches]:
            future.result()
    return sum(n for _, n in batches), len(batches), per_stream


def run(dsn: str | None, messages: int, streams: int) -> int:
    """Write `messages` over `streams` streams, project them twice, subscribe to one."""
    if dsn is None:
        # The embedded server (POSIX-only, its binaries an optional extra) only without a DSN.
        from ._embedded import start_embedded

        print("starting the embedded PostgreSQL in ./.depeche-rs/pgdata ...", flush=True)
        dsn = start_embedded()
    name = "demo_" + _uuid.uuid4().hex[:8]
    store: MessageStore[DemoEvent] = MessageStore(name, dsn, DemoSerializer())
    print(f"store {name!r} on {redact(dsn)}")

    started = _time.perf_counter()
    written, n_streams, per_stream = _write_backlog(store, messages, streams)
    took = _time.perf_counter() - started
    print(
        f"wrote     {written:>8,} messages to {n_streams:,} streams in {took:6.2f} s "
        f"({_rate(written, took)}; {per_stream} per transaction, 4 writers)"
    )

    by_name = store.aggregated_stream(f"{name}_by_stream", StreamNamePartitioner(), ["account-%"])
    started = _time.perf_counter()
    result = by_name.projector.update_full()
    took = _time.perf_counter() - started
    positions = by_name.get_max_aggregated_stream_positions()
    print(
        f"projected {result.n_updated_messages:>8,} messages into {len(positions):,} partitions "
        f"in {took:6.2f} s ({_rate(result.n_updated_messages, took)}; StreamNamePartitioner "
        "in Rust)"
    )

    by_account = store.aggregated_stream(f"{name}_by_account", AccountPartitioner(), ["account-%"])
    started = _time.perf_counter()
    result = by_account.projector.update_full()
    took = _time.perf_counter() - started
    print(
        f"projected {result.n_updated_messages:>8,} messages into 8 partitions "
        f"in {took:6.2f} s ({_rate(result.n_updated_messages, took)}; Python partitioner)"
    )
    again = by_account.projector.update_full()
    print(f"re-ran the projector: {again.n_updated_messages} new messages (none twice)")

    handled: dict[int, list[int]] = {}
    handlers: MessageHandlerRegister[DemoEvent] = MessageHandlerRegister()

    def handle(message: SubscriptionMessage[DemoEvent]) -> None:
        handled.setdefault(message.partition, []).append(message.position)

    handlers.register(handle)
    subscription = by_account.subscription(
        name=f"{name}_sub", handlers=handlers, batch_size=500, ack_strategy=AckStrategy.BATCHED
    )
    started = _time.perf_counter()
    subscription.runner.run_once()
    took = _time.perf_counter() - started
    read = sum(len(p) for p in handled.values())
    in_order = all(p == list(range(len(p))) for p in handled.values())
    print(
        f"handled   {read:>8,} messages through a subscription in {took:6.2f} s "
        f"({_rate(read, took)}; BATCHED ack; "
        f"{'in position order' if in_order else 'OUT OF ORDER'} in every partition)"
    )
    ok = read == written and in_order
    print("all messages accounted for" if ok else f"MISMATCH: wrote {written}, handled {read}")
    return 0 if ok else 1
