"""A dump of a running store restored into a fresh cluster: the projector projects
exactly what was missing (unprojected rows, rows committed after its last batch), goes on
with new writes, and an idle batch does not keep re-reading the restored rows."""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from depeche_rs import AggregatedStream, MessageStore
from depeche_rs.tools import PydanticMessageSerializer, StreamHashPartitioner

from ._models import AnyEvent, Deposited
from ._operations import (
    Store,
    assert_projection,
    burn_xids_until,
    current_xid,
    engine_for,
    private_cluster,
    private_database,
    run_pg_program,
    write,
)

BOTH = ["acc-%", "loan-%"]
# More transactions than a test runs on either side after the ids were moved apart.
XID_MARGIN = 20_000


@pytest.fixture(scope="module")
def fresh_cluster() -> Iterator[str]:
    """A second PostgreSQL cluster, private to this module. Nothing but the tests may
    read the tables (the cost test counts row reads): autovacuum is off."""
    with private_cluster("depeche-rs-fresh-cluster-", {"autovacuum": "off"}) as dsn:
        yield dsn


def _open(engine: sa.Engine, store_name: str, agg: str) -> tuple[Store, AggregatedStream[AnyEvent]]:
    store = MessageStore(store_name, engine, PydanticMessageSerializer(AnyEvent))
    return store, store.aggregated_stream(agg, StreamHashPartitioner(3), BOTH, update_batch_size=50)


def _fill(store: Store, n: int, tag: int) -> list[uuid.UUID]:
    """`n` messages over `acc-` and `loan-` streams, and a few that do not match."""
    ids = []
    for i in range(0, n, 10):
        stream = f"acc-{i % 100 // 10}" if i % 30 else f"loan-{i % 4}"
        events = [Deposited(account=tag, amount=j) for j in range(min(10, n - i))]
        store.write_many(stream, events)
        ids += [e.event_id for e in events]
        if i % 50 == 0:
            write(store, f"other-{tag}")
    return ids


@dataclasses.dataclass(frozen=True)
class Dump:
    path: Path
    store: str
    agg: str
    missing: int  # matching messages the source's projector had not projected


def _dump_a_running_store(dsn: str, suffix: str, size: int, tmp_path: Path) -> Dump:
    """Write and project `size` messages in a database of their own on the test server,
    leaving some unprojected and some committed after the projector's last batch; dump it.

    A database of its own, because a whole-database dump carries the functions and
    triggers the tables need, and the shared test database holds other tests' tables.
    """
    store_name, agg_name = "s_" + suffix, "a_" + suffix
    with private_database(dsn, "source_" + suffix) as source, engine_for(source) as engine:
        store, agg = _open(engine, store_name, agg_name)
        _fill(store, size, 0)
        agg.projector.update_full()
        with engine.connect() as late:
            late_ids = write(store, "acc-late-1", "loan-late-1", conn=late)
            _fill(store, 60, 1)
            agg.projector.update_full()
            late.commit()
        unprojected = late_ids + _fill(store, 30, 2)
        agg.projector.close()
        assert_projection(engine, store_name, agg_name, BOTH, unprojected=unprojected)
        path = tmp_path / f"{suffix}-{size}.dump"
        run_pg_program("pg_dump", "--format=custom", "--file", path, "--dbname", source)
    return Dump(path, store_name, agg_name, len(unprojected))


# What a restore script may hold that the target server rejects, and that the tables do
# not need: private column options of the test environment's server build, and the
# `transaction_timeout` (PostgreSQL 17+) pg_restore 18 sets, for an older test server.
_NOT_PORTABLE = re.compile(
    r"^(ALTER TABLE ONLY .* ALTER COLUMN .* SET \(pg_attver=\d+\);|SET transaction_timeout = 0;)$"
)


def _run_restore_script(dump: Dump, target: str, *options: str) -> None:
    """Restore as pg_restore's SQL script, run by psql."""
    script = run_pg_program("pg_restore", *options, "--file=-", dump.path).stdout
    sql_file = dump.path.with_suffix(".sql")
    sql_file.write_text(
        "".join(line + "\n" for line in script.splitlines() if not _NOT_PORTABLE.match(line))
    )
    run_pg_program(
        "psql", "--no-psqlrc", "-v", "ON_ERROR_STOP=1", "-q", "-d", target, "-f", sql_file
    )


def _restore_everything(dump: Dump, engine: sa.Engine, target: str) -> None:
    """Schema and data."""
    _run_restore_script(dump, target)


def _restore_data_into_new_tables(dump: Dump, engine: sa.Engine, target: str) -> None:
    """The application creates its tables, then the data is restored into them."""
    _open(engine, dump.store, dump.agg)
    _run_restore_script(dump, target, "--data-only")


RESTORES: dict[str, Callable[[Dump, sa.Engine, str], None]] = {
    "full": _restore_everything,
    "data-only": _restore_data_into_new_tables,
}


def _move_xids_apart(ahead: str, source: str, target: str) -> None:
    """Make one cluster's transaction ids lie wholly above the other's."""
    if ahead == "source":
        burn_xids_until(source, current_xid(target) + XID_MARGIN)
    else:
        burn_xids_until(target, current_xid(source) + XID_MARGIN)


# Where the dump is restored: (on a fresh cluster?, whose transaction ids are ahead)
TARGETS = {
    "fresh-cluster-source-xids-ahead": (True, "source"),
    "fresh-cluster-target-xids-ahead": (True, "target"),
    "same-cluster": (False, None),
}


@pytest.mark.parametrize("restore", list(RESTORES.values()), ids=list(RESTORES))
@pytest.mark.parametrize(("fresh", "ahead"), list(TARGETS.values()), ids=list(TARGETS))
def test_restored_dump_projects_exactly_the_missing_messages_then_new_ones(
    dsn: str,
    suffix: str,
    fresh_cluster: str,
    tmp_path: Path,
    restore: Any,
    fresh: bool,
    ahead: str | None,
) -> None:
    server = fresh_cluster if fresh else dsn
    if ahead is not None:
        _move_xids_apart(ahead, dsn, server)
    dump = _dump_a_running_store(dsn, suffix, 300, tmp_path)
    with (
        private_database(server, "restored_" + suffix) as target,
        engine_for(target) as engine,
    ):
        restore(dump, engine, target)
        store, agg = _open(engine, dump.store, dump.agg)
        assert agg.projector.update_full() == (dump.missing, False)
        assert_projection(engine, dump.store, dump.agg, BOTH)
        with engine.connect() as late:
            write(store, "acc-late-2", conn=late)
            _fill(store, 40, 3)
            assert agg.projector.update_full() == (40, False)
            late.commit()
        assert agg.projector.update_full() == (1, False)
        agg.projector.close()
        assert_projection(engine, dump.store, dump.agg, BOTH)


def test_data_only_restore_with_triggers_disabled_is_refused(
    dsn: str, suffix: str, fresh_cluster: str, tmp_path: Path
) -> None:
    # With the stamping trigger off, the rows would keep the other cluster's ids.
    dump = _dump_a_running_store(dsn, suffix, 50, tmp_path)
    with (
        private_database(fresh_cluster, "restored_" + suffix) as target,
        engine_for(target) as engine,
    ):
        _open(engine, dump.store, dump.agg)
        restore = ["--exit-on-error", "--data-only", "--disable-triggers", "--dbname", target]
        result = run_pg_program("pg_restore", *restore, dump.path, check=False)
        assert result.returncode != 0
        assert "depeche_rs_tx_is_local" in result.stderr
        with engine.connect() as conn:
            count = conn.exec_driver_sql(f"SELECT count(*) FROM depeche_msgs_{dump.store}")
            assert count.scalar() == 0


def _rows_read_once_alone(dsn: str) -> int:
    """Rows read so far from the database's tables (sequential-scan rows plus index
    entries), once every other session has left: a backend flushes its statistics
    before it leaves pg_stat_activity."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        while conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone() != (0,):
            conn.execute("SELECT pg_sleep(0.01)")
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT (SELECT coalesce(sum(seq_tup_read), 0) FROM pg_stat_user_tables) "
            "     + (SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes)"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _rows_read_by(dsn: str, agg: AggregatedStream[AnyEvent], expected: tuple[int, bool]) -> int:
    """Rows the tables gave to one `update_full` on a connection of its own."""
    agg.projector.close()
    before = _rows_read_once_alone(dsn)
    assert agg.projector.update_full() == expected
    agg.projector.close()
    return _rows_read_once_alone(dsn) - before


def test_idle_batches_after_a_restore_read_the_same_rows_whatever_the_table_size(
    dsn: str, suffix: str, fresh_cluster: str, tmp_path: Path
) -> None:
    sizes = (200, 1000)
    idle_costs = []
    for size in sizes:
        _move_xids_apart("source", dsn, fresh_cluster)
        dump = _dump_a_running_store(dsn, f"{suffix}_{size}", size, tmp_path)
        with private_database(fresh_cluster, f"restored_{suffix}_{size}") as target:
            with engine_for(target) as engine:
                _restore_everything(dump, engine, target)
                _, agg = _open(engine, dump.store, dump.agg)
            catch_up = _rows_read_by(target, agg, (dump.missing, False))
            assert catch_up >= size, "the statistics do not show the catch-up's reads"
            idle_costs.append([_rows_read_by(target, agg, (0, False)) for _ in range(2)])
    assert idle_costs[0] == idle_costs[1], f"idle reads for {sizes} rows: {idle_costs}"
    assert max(idle_costs[1]) < sizes[0]
