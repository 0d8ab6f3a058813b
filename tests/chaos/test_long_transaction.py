"""A long transaction under a running projector process.

Transaction A reserves a global position (it writes its message first) and stays open;
transaction B takes its transaction id early (an unrelated row) and writes its message
only at the end, to a stream others wrote meanwhile. Thousands of other transactions
commit while both are open and the projector keeps running in its own process, killed
and disconnected once each on the way. Everything committed is projected while A and B
are open; after they commit, their messages are projected too, and the test reports how
long that took.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from depeche_rs import MessageStore
from depeche_rs.tools import PydanticMessageSerializer, StreamHashPartitioner

from .._helpers import check_invariants
from .._models import AccountCreated, AnyEvent, Deposited
from ._harness import Saboteur, Settings, Supervisor, Worker, derive_seed, private_database

pytestmark = pytest.mark.chaos

SETTINGS = Settings.from_env()
COMMITS = SETTINGS.scaled(3000)
WRITER_THREADS = 2
STORE = "longtx"
AGG = "longtx_agg"


def _projected(conn: psycopg.Connection[Any], message_id: uuid.UUID) -> bool:
    row = conn.execute(f"SELECT 1 FROM depeche_stream_{AGG} WHERE message_id = %s", (message_id,))
    return row.fetchone() is not None


def _count(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(f"SELECT count(*) FROM depeche_stream_{AGG}").fetchone()
    assert row is not None
    return int(row[0])


def _wait_for(condition: Callable[[], bool], limit: float) -> float | None:
    """Seconds until `condition()` held (polled every 2 ms), None if it never did."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if condition():
            return time.monotonic() - started
        time.sleep(0.002)
    return None


@pytest.mark.timeout(240 + COMMITS / 20)
def test_long_transactions_do_not_hold_back_others_and_are_projected_after_commit(
    dsn: str, tmp_path: Path, settings: Settings, report: Callable[[str], None]
) -> None:
    with private_database(dsn, f"chaos_{uuid.uuid4().hex[:12]}") as database:
        store: MessageStore[AnyEvent] = MessageStore(
            STORE, database, PydanticMessageSerializer(AnyEvent)
        )
        try:
            _run(store, database, tmp_path, settings, report)
        finally:
            store.engine.dispose()


def _run(
    store: MessageStore[AnyEvent],
    database: str,
    tmp_path: Path,
    settings: Settings,
    report: Callable[[str], None],
) -> None:
    store.aggregated_stream(AGG, StreamHashPartitioner(4), ["acc-%"])
    engine = store.engine
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE side (note text)")
    projector = Worker(
        "projector",
        "projector",
        {
            "dsn": database,
            "store": STORE,
            "agg": AGG,
            "wildcards": ["acc-%"],
            "partitions": 4,
            "batch_size": 100,
            "poll": 0.01,
        },
    )
    errors: list[BaseException] = []
    written = 0
    written_lock = threading.Lock()

    def write(worker: int) -> None:
        nonlocal written
        try:
            for i in range(COMMITS // WRITER_THREADS):
                store.write(f"acc-{(worker * 7 + i) % 50}", Deposited(account=worker, amount=i))
                with written_lock:
                    written += 1
        except BaseException as exc:
            errors.append(exc)

    with (
        Supervisor(tmp_path, derive_seed(settings.seed, "long"), 600) as supervisor,
        Saboteur(database) as saboteur,
        engine.connect() as tx_a,
        engine.connect() as tx_b,
        psycopg.connect(database, autocommit=True) as watch,
    ):
        supervisor.add(projector)
        assert supervisor.wait_ready(60) == []
        a_id, b_id = uuid.uuid4(), uuid.uuid4()
        reserved = store.write("acc-long", AccountCreated(event_id=a_id, account=0), conn=tx_a)
        tx_b.exec_driver_sql("INSERT INTO side VALUES ('B takes its transaction id now')")
        tx_b.exec_driver_sql("SELECT pg_current_xact_id()")
        opened = time.monotonic()
        writers = [threading.Thread(target=write, args=(w,)) for w in range(WRITER_THREADS)]
        for thread in writers:
            thread.start()
        try:
            # Faults on the way: the projector killed (its cursor snapshot still has A and
            # B running), then its connection terminated.
            assert _wait_for(lambda: written >= COMMITS // 3, 120) is not None
            supervisor.kill(projector)
            supervisor.start(projector)
            assert _wait_for(lambda: written >= 2 * COMMITS // 3, 120) is not None
            rng = random.Random(derive_seed(settings.seed, "long"))
            assert _wait_for(lambda: saboteur.terminate(rng, "projector", None) > 0, 30)
        finally:
            for thread in writers:
                thread.join()
        assert errors == []
        assert written == COMMITS
        caught_up = _wait_for(lambda: _count(watch) == COMMITS, 60)
        assert caught_up is not None, f"only {_count(watch)} of {COMMITS} projected"
        assert not _projected(watch, a_id)

        # B writes the next version of a stream others wrote while it was open.
        store.write("acc-7", Deposited(event_id=b_id, account=7, amount=-1), conn=tx_b)
        tx_b.commit()
        b_after = _wait_for(lambda: _projected(watch, b_id), 30)
        tx_a.commit()
        a_after = _wait_for(lambda: _projected(watch, a_id), 30)
        held = time.monotonic() - opened
        assert b_after is not None, "B was never projected"
        assert a_after is not None, "A was never projected"
        assert supervisor.stop("projector") == []
        assert supervisor.unexpected() == []
        assert supervisor.bad_exits() == []
        faults = sum(
            1 for _, e in supervisor.events() if e.get("ev") == "fault"
        )  # the termination, seen by the projector

    rows = check_invariants(engine, STORE, AGG, "acc-%")
    assert len(rows) == COMMITS + 2
    by_id = {r[0]: r for r in rows}
    assert by_id[a_id][6] == reserved.global_position
    # A holds the lowest global position of all, yet comes last in its partition.
    assert all(r[6] > by_id[a_id][6] for r in rows if r[0] != a_id)
    assert by_id[a_id][4] == max(r[4] for r in rows if r[3] == by_id[a_id][3])
    report(
        f"long_transaction commits_behind={COMMITS} held_open={held:.1f}s "
        f"caught_up_while_open={caught_up:.2f}s "
        f"b_projected_after={b_after * 1000:.0f}ms a_projected_after={a_after * 1000:.0f}ms "
        f"projector_kills=1 terminations={saboteur.terminations} projector_faults={faults} "
        f"lost=0 duplicated=0 seed={settings.seed}"
    )
