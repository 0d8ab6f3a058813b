"""The projector never skips or duplicates a message: out-of-order commits, long
transactions, rollbacks, concurrent projectors, kills, dropped connections, Ctrl-C, fork."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import depeche_rs
from depeche_rs import MessageStore, StoredMessage
from depeche_rs.tools import StreamHashPartitioner, StreamNamePartitioner

from ._helpers import check_invariants, projected_rows
from ._models import AccountCreated, AnyEvent, Deposited

Store = MessageStore[AnyEvent]


def test_late_commit_of_an_earlier_global_position_is_projected(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    agg = store.aggregated_stream(stream_name, StreamHashPartitioner(1), ["acc-%"])
    with engine.connect() as slow:
        early = store.write("acc-1", AccountCreated(account=1), conn=slow)
        late = store.write("acc-2", AccountCreated(account=2))
        assert early.global_position is not None and late.global_position is not None
        assert early.global_position < late.global_position
        assert agg.projector.update_full() == (1, False)
        assert agg.projector.update_full() == (0, False)
        slow.commit()
    assert agg.projector.update_full() == (1, False)
    rows = check_invariants(engine, store.name, stream_name)
    assert [r[1] for r in rows] == ["acc-2", "acc-1"]


def test_transaction_with_early_id_commits_next_version_after_projection(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    # T1 takes its transaction id first (it writes an unrelated row), T2 writes v1 and
    # commits, the projector runs, then T1 writes v2 of the same stream and commits.
    agg = store.aggregated_stream(stream_name, StreamHashPartitioner(2), ["acc-%"])
    with engine.connect() as t1:
        t1.exec_driver_sql("CREATE TEMP TABLE scratch (x int)")
        t1.exec_driver_sql("INSERT INTO scratch VALUES (1)")
        t1.exec_driver_sql("SELECT pg_current_xact_id()")
        store.write("acc-1", AccountCreated(account=1))
        assert agg.projector.update_full() == (1, False)
        store.write("acc-1", Deposited(account=1, amount=1), conn=t1)
        store.write("acc-3", Deposited(account=3, amount=1))
        assert agg.projector.update_full() == (1, False)
        t1.commit()
    assert agg.projector.update_full() == (1, False)
    rows = check_invariants(engine, store.name, stream_name)
    assert sorted((r[1], r[2]) for r in rows) == [("acc-1", 1), ("acc-1", 2), ("acc-3", 1)]


def test_rollbacks_leave_holes_that_are_never_filled(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    agg = store.aggregated_stream(
        stream_name, StreamHashPartitioner(3), ["acc-%"], update_batch_size=7
    )
    for i in range(60):
        if i % 3 == 0:
            with engine.connect() as conn:
                store.write(f"acc-{i % 5}", AccountCreated(account=i), conn=conn)
                conn.rollback()
        else:
            store.write(f"acc-{i % 5}", AccountCreated(account=i))
        if i % 10 == 0:
            agg.projector.update_full()
    agg.projector.update_full()
    rows = check_invariants(engine, store.name, stream_name)
    assert len(rows) == 40


def test_long_transaction_does_not_block_others_and_is_projected_after_commit(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    agg = store.aggregated_stream(
        stream_name, StreamHashPartitioner(4), ["acc-%"], update_batch_size=100
    )
    with engine.connect() as long_tx:
        reserved = store.write("acc-long", AccountCreated(account=0), conn=long_tx)
        committed = 0
        for round_ in range(10):
            for i in range(200):
                store.write(f"acc-{i % 50}", Deposited(account=i, amount=round_))
                committed += 1
            agg.projector.update_full()
            # Everything committed so far is projected while the long transaction is open.
            assert len(projected_rows(engine, stream_name)) == committed
        long_tx.commit()
    started = time.monotonic()
    assert agg.projector.update_full() == (1, False)
    took = time.monotonic() - started
    rows = check_invariants(engine, store.name, stream_name)
    assert len(rows) == 2001
    assert any(r[0] for r in rows if r[1] == "acc-long" and r[6] == reserved.global_position)
    print(f"late message projected {took * 1000:.1f} ms after its commit")


def test_a_second_projector_returns_at_once_while_the_stream_is_locked(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    store.write("acc-1", AccountCreated(account=1))
    agg = store.aggregated_stream(stream_name, StreamNamePartitioner(), ["acc-%"])
    with engine.connect() as holder:
        holder.exec_driver_sql(f"LOCK TABLE depeche_stream_{stream_name} IN EXCLUSIVE MODE")
        assert agg.projector.update_full() == (0, False)
        assert agg.projector.run() == depeche_rs.RunOnNotificationResult.DONE_FOR_NOW
        holder.rollback()
    assert agg.projector.update_full() == (1, False)


def test_concurrent_projectors_and_writers_lose_and_duplicate_nothing(
    store: Store, stream_name: str, engine: sa.Engine, serializer: Any
) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        try:
            for i in range(150):
                if i % 7 == 0:
                    with engine.connect() as conn:
                        store.write(f"acc-{worker}-{i % 4}", AccountCreated(account=i), conn=conn)
                        if i % 2:
                            conn.rollback()
                        else:
                            conn.commit()
                else:
                    store.write(f"acc-{worker}-{i % 4}", Deposited(account=worker, amount=i))
                if i % 11 == 0:
                    store.write(f"other-{worker}", AccountCreated(account=i))
        except BaseException as exc:
            errors.append(exc)

    def projector() -> None:
        mine = MessageStore(store.name, engine, serializer).aggregated_stream(
            stream_name, StreamHashPartitioner(5), ["acc-%"], update_batch_size=13
        )
        try:
            while not stop.is_set():
                mine.projector.update_full()
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    projectors = [threading.Thread(target=projector) for _ in range(3)]
    for t in writers + projectors:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in projectors:
        t.join()
    assert errors == []
    agg = store.aggregated_stream(stream_name, StreamHashPartitioner(5), ["acc-%"])
    agg.projector.update_full()
    rows = check_invariants(engine, store.name, stream_name, "acc-%")
    assert len(rows) == 4 * (150 - 11)


_CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from depeche_rs import MessageStore
    from depeche_rs.tools import PydanticMessageSerializer
    from tests._models import AnyEvent

    class Slow:
        def get_partition(self, message):
            time.sleep({delay})
            return message.message.account % 3

    store = MessageStore({store!r}, {dsn!r}, PydanticMessageSerializer(AnyEvent))
    agg = store.aggregated_stream({agg!r}, Slow(), ["acc-%"], update_batch_size=10)
    print("ready", flush=True)
    print(agg.projector.update_full(), flush=True)
    """
)


def _spawn(dsn: str, store: str, agg: str, delay: float) -> subprocess.Popen[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _CHILD.format(tests=root, dsn=dsn, store=store, agg=agg, delay=delay)
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _fill(store: Store, n: int) -> None:
    for start in range(0, n, 50):
        for account in range(3):
            store.write_many(
                f"acc-{account}",
                [
                    Deposited(account=account, amount=i)
                    for i in range(start, start + 50)
                    if i % 3 == account
                ],
            )


def test_killed_projector_leaves_whole_batches_only(
    store: Store, stream_name: str, engine: sa.Engine, dsn: str
) -> None:
    _fill(store, 600)
    agg = store.aggregated_stream(stream_name, StreamHashPartitioner(3), ["acc-%"])
    for kill_after in (0.3, 0.7):
        child = _spawn(dsn, store.name, stream_name, 0.002)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(kill_after)
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=10)
        rows = projected_rows(engine, stream_name)
        assert len(rows) % 10 == 0  # whole batches of 10
        assert len({r[0] for r in rows}) == len(rows)
    agg2 = store.aggregated_stream(stream_name, _AccountMod3(), ["acc-%"], update_batch_size=10)
    agg2.projector.update_full()
    rows = check_invariants(engine, store.name, stream_name)
    assert len(rows) == 600
    del agg


class _AccountMod3:
    def get_partition(self, message: StoredMessage[Any]) -> int:
        return int(message.message.account) % 3


def test_ctrl_c_interrupts_a_long_update_full(
    store: Store, stream_name: str, engine: sa.Engine, dsn: str
) -> None:
    _fill(store, 600)
    store.aggregated_stream(stream_name, StreamHashPartitioner(3), ["acc-%"])
    child = _spawn(dsn, store.name, stream_name, 0.01)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=10)
    assert child.returncode != 0
    assert "KeyboardInterrupt" in err
    rows = projected_rows(engine, stream_name)
    assert 0 < len(rows) < 600
    assert len(rows) % 10 == 0


def test_terminated_connection_mid_batch_loses_nothing_and_recovers(
    store: Store, stream_name: str, engine: sa.Engine, dsn: str
) -> None:
    _fill(store, 300)
    entered = threading.Event()
    release = threading.Event()

    class Blocking:
        calls = 0

        def get_partition(self, message: StoredMessage[Any]) -> int:
            # In the first batch, whose rows are assigned inside it: later batches' rows
            # are assigned while the batch before them is written (read ahead), so a
            # connection lost then is lost between batches and replaced at once.
            Blocking.calls += 1
            if Blocking.calls == 5:
                entered.set()
                release.wait(10)
            return int(message.message.account) % 3

    agg = store.aggregated_stream(stream_name, Blocking(), ["acc-%"], update_batch_size=10)
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(agg.projector.update_full())
        except Exception as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    assert entered.wait(10)
    with psycopg.connect(dsn, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s",
            (f"depeche-rs projector depeche_stream_{stream_name}",),
        ).fetchone()
    assert killed == (1,)
    release.set()
    worker.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], depeche_rs.DatabaseConnectionError)
    assert len(projected_rows(engine, stream_name)) == 0
    assert agg.projector.update_full() == (300, False)
    rows = check_invariants(engine, store.name, stream_name)
    assert len(rows) == 300


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_projects_with_a_fresh_runtime(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    agg = store.aggregated_stream(
        stream_name, StreamHashPartitioner(2), ["acc-%"], update_batch_size=5
    )
    for i in range(10):
        store.write(f"acc-{i}", AccountCreated(account=i))
    assert agg.projector.update_full() == (10, False)
    engine.dispose()  # the child must not share pooled connections with us
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            for i in range(10, 20):
                store.write(f"acc-{i}", AccountCreated(account=i))
            code = 0 if agg.projector.update_full() == (10, False) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    for i in range(20, 25):
        store.write(f"acc-{i}", AccountCreated(account=i))
    assert agg.projector.update_full() == (5, False)
    assert len(check_invariants(engine, store.name, stream_name)) == 25


def _read_ahead(agg: Any) -> tuple[int, int, int]:
    """(used, discarded, assigned ahead) of the projector's read-ahead (docs/projector.md)."""
    counts = agg.projector._get_native().read_ahead_counts()
    return counts.used, counts.discarded, counts.assigned


class _AccountPartitioner:
    """A partitioner of the user's: every batch goes through Python."""

    def get_partition(self, message: StoredMessage[Any]) -> int:
        return int(message.message.account) % 5


@pytest.mark.parametrize("partitioner", [StreamHashPartitioner(5), _AccountPartitioner()])
def test_read_ahead_with_late_commits_and_an_overlapping_projector_loses_nothing(
    store: Store, stream_name: str, engine: sa.Engine, serializer: Any, partitioner: Any
) -> None:
    # Two projectors of the same aggregated stream with overlapping wildcards take turns
    # batch by batch while writers commit, one of them late: each reads its next batch
    # ahead while writing the current one, and finds rows the other inserted meanwhile.
    for i in range(400):
        store.write(f"acc-{i % 37}", Deposited(account=i, amount=i))
    wide = store.aggregated_stream(stream_name, partitioner, ["acc-%"], update_batch_size=20)
    narrow = MessageStore(store.name, engine, serializer).aggregated_stream(
        stream_name, partitioner, ["acc-1%"], update_batch_size=20
    )
    with engine.connect() as slow:
        store.write("acc-slow", Deposited(account=3, amount=-1), conn=slow)
        for turn in range(30):
            wide.projector.update_batch()
            narrow.projector.update_batch()
            store.write(f"acc-{turn % 11}", Deposited(account=turn, amount=turn))
            if turn == 15:
                slow.commit()
    wide.projector.update_full()
    narrow.projector.update_full()
    rows = check_invariants(engine, store.name, stream_name, "acc-%")
    assert len(rows) == 400 + 1 + 30
    used, discarded, assigned = _read_ahead(wide)
    assert used > 0, "the catch-up never read ahead"
    assert discarded > 0, "the other projector's rows never sent a batch back"
    if isinstance(partitioner, _AccountPartitioner):
        assert assigned > 0, "Python never assigned rows while a batch was written"


def test_read_ahead_is_thrown_away_when_the_projection_is_deleted(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    for i in range(300):
        store.write(f"acc-{i % 13}", Deposited(account=i, amount=i))
    agg = store.aggregated_stream(
        stream_name, StreamNamePartitioner(), ["acc-%"], update_batch_size=25
    )
    for _ in range(3):
        assert agg.projector.update_batch() == (25, True)
    with engine.begin() as conn:
        # As our truncate() does: the positions start again from 0.
        conn.exec_driver_sql(f"DELETE FROM depeche_stream_{stream_name}")
        conn.exec_driver_sql(f"DELETE FROM depeche_stream_{stream_name}_maxpos")
    agg.projector.update_full()
    assert _read_ahead(agg)[1] >= 1
    rows = check_invariants(engine, store.name, stream_name, "acc-%")
    assert len(rows) == 300


def test_rows_assigned_ahead_still_raise_for_a_message_the_partitioner_refuses(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    # The Python partitioner runs on the next batch's rows while the batch before them is
    # written; its error there is left to the batch the message is in, which raises it
    # with everything before it projected.
    for i in range(100):
        store.write(f"acc-{i}", Deposited(account=999 if i == 56 else i, amount=i))

    class Refusing:
        def get_partition(self, message: StoredMessage[Any]) -> int:
            if message.message.account == 999:
                raise ValueError("no partition for 999")
            return int(message.message.account) % 3

    agg = store.aggregated_stream(stream_name, Refusing(), ["acc-%"], update_batch_size=10)
    with pytest.raises(depeche_rs.PartitionerError):
        agg.projector.update_full()
    assert len(projected_rows(engine, stream_name)) == 50
    used, _, assigned = _read_ahead(agg)
    assert used >= 4 and assigned >= 40


def test_a_read_ahead_older_than_five_seconds_is_not_used(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    for i in range(100):
        store.write(f"acc-{i % 7}", Deposited(account=i, amount=i))
    agg = store.aggregated_stream(
        stream_name, StreamNamePartitioner(), ["acc-%"], update_batch_size=20
    )
    assert agg.projector.update_batch() == (20, True)
    assert agg.projector.update_batch() == (20, True)
    assert _read_ahead(agg)[:2] == (1, 0)
    time.sleep(5.5)
    assert agg.projector.update_batch() == (20, True)
    assert _read_ahead(agg)[:2] == (1, 1)
    agg.projector.update_full()
    assert len(check_invariants(engine, store.name, stream_name, "acc-%")) == 100
