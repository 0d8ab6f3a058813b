"""`depeche-rs demo`: the main job on real PostgreSQL, with figures."""

from __future__ import annotations

import datetime as _dt
import time as _time
import uuid as _uuid
from typing import Any

from ._interfaces import StoredMessage


class DemoEvent:
    """A plain message class (no pydantic needed) with depeche-db's protocol."""

    def __init__(
        self,
        account: int,
        amount: int,
        event_id: _uuid.UUID | None = None,
        at: _dt.datetime | None = None,
    ) -> None:
        self.account = account
        self.amount = amount
        self.event_id = event_id or _uuid.uuid4()
        self.at = at or _dt.datetime.now(_dt.timezone.utc)

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


def run(dsn: str | None, messages: int, streams: int) -> int:
    """Write `messages` over `streams` streams, project them twice, read them back."""
    from . import MessageStore
    from .tools import StreamNamePartitioner

    if dsn is None:
        from ._embedded import start_embedded

        print("starting the embedded PostgreSQL in ./.depeche-rs/pgdata ...", flush=True)
        dsn = start_embedded()
    name = "demo_" + _uuid.uuid4().hex[:8]
    store: MessageStore[DemoEvent] = MessageStore(name, dsn, DemoSerializer())
    print(f"store {name!r} on {store.engine.url.render_as_string(hide_password=True)}")

    started = _time.perf_counter()
    per_stream = max(1, messages // streams)
    written = 0
    account = 0
    while written < messages:
        n = min(per_stream, messages - written)
        store.write_many(
            f"account-{account}", [DemoEvent(account, i) for i in range(n)], expected_version=0
        )
        written += n
        account += 1
    write_s = _time.perf_counter() - started
    print(
        f"wrote    {written:>9,} messages to {account:,} streams in {write_s:6.2f} s "
        f"({_rate(written, write_s)}, {per_stream} per transaction)"
    )

    by_name = store.aggregated_stream(f"{name}_by_stream", StreamNamePartitioner(), ["account-%"])
    started = _time.perf_counter()
    result = by_name.projector.update_full()
    took = _time.perf_counter() - started
    positions = by_name.get_max_aggregated_stream_positions()
    print(
        f"projected {result.n_updated_messages:>8,} messages into {len(positions):,} partitions "
        f"in {took:6.2f} s ({_rate(result.n_updated_messages, took)}, StreamNamePartitioner "
        "in Rust)"
    )

    by_account = store.aggregated_stream(f"{name}_by_account", AccountPartitioner(), ["account-%"])
    started = _time.perf_counter()
    result = by_account.projector.update_full()
    took = _time.perf_counter() - started
    print(
        f"projected {result.n_updated_messages:>8,} messages into 8 partitions "
        f"in {took:6.2f} s ({_rate(result.n_updated_messages, took)}, Python partitioner)"
    )

    again = by_account.projector.update_full()
    print(
        f"re-ran the projector: {again.n_updated_messages} new messages (nothing is projected "
        "twice)"
    )

    started = _time.perf_counter()
    read = 0
    with store.reader() as reader:
        for partition in range(8):
            pointers = list(by_account.read(partition))
            for stored in reader.get_messages_by_ids([p.message_id for p in pointers]):
                assert stored.message.account % 8 == partition
                read += 1
    took = _time.perf_counter() - started
    print(
        f"read back {read:>8,} messages partition by partition in {took:6.2f} s "
        f"({_rate(read, took)})"
    )
    ok = read == written
    print("all messages accounted for" if ok else f"MISMATCH: wrote {written}, read {read}")
    return 0 if ok else 1
