"""Subscriptions across processes: competing consumers, and consumers killed with
SIGKILL in the middle of a batch."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import time
from collections import Counter
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from depeche_rs import AckStrategy, MessageHandlerRegister, MessageStore, SubscriptionMessage
from depeche_rs.tools import PydanticMessageSerializer, StreamHashPartitioner

from ._models import AnyEvent, Deposited

PARTITIONS = 4
SPAWN = multiprocessing.get_context("spawn")


def _open(dsn: str, store_name: str, stream_name: str) -> Any:
    store: MessageStore[AnyEvent] = MessageStore(
        store_name, dsn, PydanticMessageSerializer(AnyEvent)
    )
    return store.aggregated_stream(stream_name, StreamHashPartitioner(PARTITIONS), ["acc-%"])


def _setup(dsn: str, store_name: str, stream_name: str, records: str, count: int) -> Any:
    stream = _open(dsn, store_name, stream_name)
    for i in range(count):
        stream.store.write(f"acc-{i % 16}", Deposited(account=i % 16, amount=i))
    while stream.projector.update_full()[1]:
        pass
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {records} (partition int, position int, pid int, "
            "started bigint, ended bigint)"
        )
    return stream


def _records(dsn: str, records: str) -> list[tuple[int, int, int, int, int]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            f"SELECT partition, position, pid, started, ended FROM {records} ORDER BY started"
        ).fetchall()


def _layout(dsn: str, stream_name: str) -> dict[int, int]:
    with psycopg.connect(dsn) as conn:
        return dict(
            conn.execute(f"SELECT partition, max_position FROM depeche_stream_{stream_name}_maxpos")
        )


def _state(dsn: str, name: str) -> dict[int, int]:
    with psycopg.connect(dsn) as conn:
        return dict(
            conn.execute(
                f"SELECT partition, position FROM depeche_subscriptions_{name} WHERE partition >= 0"
            )
        )


def _consume(
    dsn: str,
    store_name: str,
    stream_name: str,
    name: str,
    records: str,
    expected: int,
    strategy: str,
    batch_size: int,
    kill_at: tuple[int, int] | None,
    in_transaction: bool,
    go: Any,
) -> None:
    """Child process: handle messages until `records` holds `expected` distinct ones."""
    stream = _open(dsn, store_name, stream_name)
    engine: sa.Engine = stream.store.engine
    log = psycopg.connect(dsn, autocommit=True)
    pid = os.getpid()
    handlers: MessageHandlerRegister[AnyEvent] = MessageHandlerRegister()

    def die_if_asked(message: SubscriptionMessage[Any]) -> None:
        if kill_at != (message.partition, message.position):
            return
        if strategy == "SINGLE" and not in_transaction:
            # Acknowledgements are sent without waiting; let the previous one land so
            # the test knows exactly what "acknowledged" is at the time of death.
            deadline = time.monotonic() + 10
            while _state(dsn, name).get(message.partition) != message.position - 1:
                assert time.monotonic() < deadline, "previous acknowledgement never landed"
                time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)

    @handlers.register
    def handle(message: SubscriptionMessage[Deposited]) -> None:
        started = time.monotonic_ns()
        record = (message.partition, message.position, pid, started)
        if in_transaction:
            with engine.connect() as conn:
                conn.exec_driver_sql(
                    f"INSERT INTO {records} VALUES (%s, %s, %s, %s, %s)", (*record, started)
                )
                message.ack.execute(conn=conn)
                die_if_asked(message)
                conn.commit()
            return
        log.execute(f"INSERT INTO {records} VALUES (%s, %s, %s, %s, NULL)", record)
        die_if_asked(message)
        # Long enough for a second consumer to trip over a partition lock if it could.
        time.sleep(0.001)
        log.execute(
            f"UPDATE {records} SET ended = %s WHERE pid = %s AND started = %s",
            (time.monotonic_ns(), pid, started),
        )

    subscription = stream.subscription(
        name,
        handlers=handlers,
        batch_size=batch_size,
        ack_strategy=getattr(AckStrategy, strategy),
    )
    go.wait(30)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        done = log.execute(
            f"SELECT count(DISTINCT (partition, position)) FROM {records}"
        ).fetchone()
        if done is not None and done[0] >= expected:
            break
        subscription.runner.run_once()
        # Another consumer may hold what is left: look again shortly.
        time.sleep(0.002)
    subscription.close()
    log.close()


def _start(*args: Any) -> Any:
    process = SPAWN.Process(target=_consume, args=args)
    process.start()
    return process


def test_two_processes_compete_without_sharing_a_partition(
    dsn: str, store_name: str, stream_name: str, suffix: str
) -> None:
    count = 400
    records = f"records_{suffix}"
    _setup(dsn, store_name, stream_name, records, count)
    go = SPAWN.Event()
    name = f"sub_{suffix}"
    common = (dsn, store_name, stream_name, name, records, count, "SINGLE", 5, None, False, go)
    processes = [_start(*common), _start(*common)]
    go.set()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    rows = _records(dsn, records)
    # Every message exactly once (nothing failed, so nothing was redelivered).
    assert Counter((p, pos) for p, pos, *_ in rows) == Counter(
        (p, pos) for p, m in _layout(dsn, stream_name).items() for pos in range(m + 1)
    )
    assert {pid for _, _, pid, _, _ in rows} == {p.pid for p in processes}
    for partition in range(PARTITIONS):
        mine = [r for r in rows if r[0] == partition]
        # In order, and never two handlers of one partition at the same time.
        assert [r[1] for r in mine] == list(range(len(mine)))
        for before, after in itertools.pairwise(mine):
            assert before[4] is not None and before[4] <= after[3], (before, after)
    assert _state(dsn, name) == _layout(dsn, stream_name)


@pytest.mark.parametrize(
    ("strategy", "in_transaction", "redelivered"),
    [
        ("SINGLE", False, [7]),
        ("BATCHED", False, [5, 6, 7]),
        ("SINGLE", True, []),
    ],
    ids=["single", "batched", "ack_in_transaction"],
)
def test_killed_mid_batch_loses_nothing_and_redelivers_only_unacknowledged(
    dsn: str,
    store_name: str,
    stream_name: str,
    suffix: str,
    strategy: str,
    in_transaction: bool,
    redelivered: list[int],
) -> None:
    count = 80
    records = f"records_{suffix}"
    _setup(dsn, store_name, stream_name, records, count)
    layout = _layout(dsn, stream_name)
    target = min(layout)
    assert layout[target] >= 12
    name = f"sub_{suffix}"
    go = SPAWN.Event()
    go.set()
    # Batches of 5: the target partition's second batch is positions 5..9; die at 7.
    args = (dsn, store_name, stream_name, name, records, count, strategy, 5)
    victim = _start(*args, (target, 7), in_transaction, go)
    victim.join(60)
    assert victim.exitcode == -signal.SIGKILL
    assert _state(dsn, name)[target] == (4 if strategy == "BATCHED" else 6)

    survivor = _start(*args, None, in_transaction, go)
    survivor.join(60)
    assert survivor.exitcode == 0
    rows = _records(dsn, records)
    counts = Counter((p, pos) for p, pos, *_ in rows)
    assert set(counts) == {(p, pos) for p, m in layout.items() for pos in range(m + 1)}
    assert sorted(pos for (p, pos), n in counts.items() if n > 1) == redelivered
    assert all(p == target for (p, _), n in counts.items() if n > 1)
    assert _state(dsn, name) == layout
