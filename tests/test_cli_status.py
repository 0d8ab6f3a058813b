"""`depeche-rs status` and `depeche-rs migrate` against real PostgreSQL: the figures
printed are the tables' figures; the migration brings a depeche-db layout to ours.

The commands run in-process (`main(argv)`): they are short-lived and install nothing a
subprocess would isolate; `test_cli_project.py` runs the long-lived projector as one."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from depeche_rs import MessageStore
from depeche_rs.__main__ import main
from depeche_rs._cli import _catalog, _server_settings
from depeche_rs._cli._migrate import migration_script
from depeche_rs._cli._server_settings import buffers_advice
from depeche_rs._schema import SCHEMA_VERSION
from depeche_rs.tools import DbSubscriptionStateProvider, StreamHashPartitioner

from ._helpers import check_invariants
from ._models import AnyEvent, Deposited
from .test_cli_harness import forget_registrations

Store = MessageStore[AnyEvent]


@pytest.fixture(autouse=True)
def _forget(dsn: str, stream_name: str) -> Iterator[None]:
    yield
    forget_registrations(dsn, stream_name)


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture()
def run(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """`depeche-rs ARGS`, in this process."""

    def run_main(*argv: str) -> Result:
        capsys.readouterr()
        code = main(list(argv))
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run_main


Run = Callable[..., Result]


def _write(store: Store, streams: int, per_stream: int, prefix: str = "acc") -> None:
    for i in range(streams):
        store.write_many(
            f"{prefix}-{i}", [Deposited(account=i, amount=j) for j in range(per_stream)]
        )


def _scalar(engine: sa.Engine, query: str) -> Any:
    with engine.connect() as conn:
        return conn.exec_driver_sql(query).scalar()


def test_status_figures_match_the_tables(
    store: Store, stream_name: str, engine: sa.Engine, dsn: str, tmp_path: Path, run: Run
) -> None:
    _write(store, streams=7, per_stream=6)  # acc-0..acc-6 fall into all 4 partitions
    projected = run(
        "project",
        "--dsn",
        dsn,
        "--store",
        store.name,
        "--stream",
        stream_name,
        "--wildcard",
        "acc-%",
        "--partitioner",
        "hash-mod:4",
        "--once",
        "--log-format",
        "json",
    )
    assert projected.returncode == 0, projected.stderr
    # A stream the library created: `status` knows neither its wildcards nor its store.
    library = store.aggregated_stream(f"{stream_name}_lib", StreamHashPartitioner(2), ["acc-1"])
    assert library.projector.update_full() == (6, False)
    _write(store, streams=1, per_stream=7, prefix="acc-late")
    _write(store, streams=1, per_stream=5, prefix="other")

    agg = f"depeche_stream_{stream_name}"
    maxpos = dict(sa_rows(engine, f"SELECT partition, max_position FROM {agg}_maxpos ORDER BY 1"))
    assert len(maxpos) == 4 and sum(m + 1 for m in maxpos.values()) == 42
    p0, p1, p2, p3 = sorted(maxpos)
    sub = f"{stream_name}_sub"
    state = DbSubscriptionStateProvider(sub, engine)
    state.initialize(sub)
    state.store(sub, p0, 0)
    state.store(sub, p1, maxpos[p1])
    state.store(sub, p2, maxpos[p2] - 1)
    expected_lags = {p0: maxpos[p0], p1: 0, p2: 1, p3: maxpos[p3] + 1}

    result = run(
        "status",
        "--dsn",
        dsn,
        "--store",
        store.name,
        "--json",
        "--top",
        "2",
        "--subscription",
        f"{sub}={stream_name}",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    streams = {s["name"]: s for s in data["aggregated_streams"]}
    assert set(streams) == {stream_name, f"{stream_name}_lib"}

    oldest = _scalar(
        engine,
        f"SELECT min(added_at) FROM depeche_msgs_{store.name} AS m WHERE stream LIKE 'acc-%%' "
        f"AND NOT EXISTS (SELECT 1 FROM {agg} AS a WHERE a.message_id = m.message_id)",
    )
    main = streams[stream_name]
    assert main["store"] == store.name
    assert main["wildcards"] == ["acc-%"]
    assert main["definition"] == "registry"
    assert main["partitions"] == _scalar(engine, f"SELECT count(DISTINCT partition) FROM {agg}")
    assert main["messages"] == _scalar(engine, f"SELECT count(*) FROM {agg}") == 42
    assert main["backlog"] == 7
    assert main["oldest_unprojected_written_at"] == oldest.isoformat()
    assert main["oldest_unprojected_age_seconds"] > 0
    assert main["projector"] is None

    lib = streams[f"{stream_name}_lib"]
    assert (lib["store"], lib["wildcards"], lib["backlog"]) == (store.name, None, None)
    assert (lib["partitions"], lib["messages"]) == (
        _scalar(engine, f"SELECT count(DISTINCT partition) FROM {agg}_lib"),
        6,
    )

    [subscription] = data["subscriptions"]
    top = sorted(expected_lags.items(), key=lambda kv: (-kv[1], kv[0]))[:2]
    assert subscription == {
        "name": sub,
        "state_table": sub,
        "stream": stream_name,
        "stream_inferred": False,
        "total_lag": sum(expected_lags.values()),
        "partitions": [
            {
                "partition": p,
                "position": {p0: 0, p1: maxpos[p1], p2: maxpos[p2] - 1}.get(p),
                "max_position": maxpos[p],
                "lag": lag,
            }
            for p, lag in top
        ],
        "note": None,
    }

    # The same figures for people; a config file gives the library stream's wildcards.
    config = tmp_path / "streams.toml"
    config.write_text(
        f'[[streams]]\nstore = "{store.name}"\nstream = "{stream_name}_lib"\n'
        'wildcards = ["acc-1"]\n'
    )
    text = run(
        "status",
        "--dsn",
        dsn,
        "--store",
        store.name,
        "--config",
        str(config),
        "--top",
        "2",
        "--subscription",
        f"{sub}={stream_name}",
    )
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    rows = {cells[0]: cells for cells in (re.split(r"\s{2,}", line) for line in lines)}
    assert rows[stream_name][1:5] == [store.name, "4", "42", "7"]
    assert rows[stream_name][5].endswith(" s ago")
    assert rows[stream_name][6] == "none active"
    lib_partitions = str(lib["partitions"])
    assert rows[f"{stream_name}_lib"][1:7] == [
        store.name,
        lib_partitions,
        "6",
        "0",
        "-",
        "none active",
    ]
    total = f"{sum(expected_lags.values()):,}"
    assert rows[sub] == [sub, stream_name, total, ", ".join(f"{p}: {lag:,}" for p, lag in top)]


def sa_rows(engine: sa.Engine, query: str) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.exec_driver_sql(query).all())


def test_status_of_an_unknown_store_exits_1(dsn: str, store_name: str, run: Run) -> None:
    result = run("status", "--dsn", dsn, "--store", store_name)
    assert result.returncode == 1
    assert f"there is no message store '{store_name}'" in result.stderr


def test_migrate_prints_the_script_without_connecting(
    store_name: str, stream_name: str, run: Run
) -> None:
    result = run("migrate", "--store", store_name, "--stream", stream_name)
    assert result.returncode == 0, result.stderr
    script = migration_script(store_name, [stream_name], [])
    assert result.stdout == (
        "-- depeche-rs migrate: brings depeche-db layouts to depeche-rs's; idempotent\n"
        f"BEGIN;\n\n{script}\nCOMMIT;\n"
    )
    assert f"CREATE TABLE IF NOT EXISTS depeche_stream_{stream_name}_cursor" in script
    assert f"ALTER TABLE depeche_msgs_{store_name} ADD COLUMN IF NOT EXISTS tx xid8" in script


def test_migrate_apply_brings_a_depeche_db_layout_to_ours_twice_then_it_projects(
    store_name: str, stream_name: str, suffix: str, engine: sa.Engine, dsn: str, run: Run
) -> None:
    msgs, agg, state = f"depeche_msgs_{store_name}", f"depeche_stream_{stream_name}", f"c_{suffix}"
    with engine.begin() as conn:
        # depeche-db's store, and an aggregated stream in its 0.8-0.10 layout.
        conn.exec_driver_sql(f"CREATE SEQUENCE {msgs}_global_seq")
        conn.exec_driver_sql(
            f"CREATE TABLE {msgs} (message_id uuid PRIMARY KEY, "
            f"global_position bigint NOT NULL DEFAULT nextval('{msgs}_global_seq') UNIQUE, "
            "added_at timestamp NOT NULL DEFAULT now(), stream varchar(255) NOT NULL, "
            "version int NOT NULL, message jsonb NOT NULL, UNIQUE (stream, version))"
        )
        conn.exec_driver_sql(
            f"INSERT INTO {msgs} (message_id, stream, version, message) "
            "SELECT gen_random_uuid(), 'acc-' || (i %% 3), i / 3 + 1, "
            "json_build_object('account', i %% 3) FROM generate_series(0, 5) AS i"
        )
        conn.exec_driver_sql(
            f"CREATE TABLE {agg} (message_id uuid PRIMARY KEY, origin_stream varchar(255) "
            "NOT NULL, origin_stream_version int NOT NULL, partition int NOT NULL, "
            "position int NOT NULL, message_occurred_at timestamp NOT NULL, "
            "UNIQUE (partition, position))"
        )
        conn.exec_driver_sql(
            f"INSERT INTO {agg} SELECT message_id, stream, version, 0, "
            "row_number() OVER (ORDER BY global_position) - 1, added_at "
            f"FROM {msgs} WHERE global_position <= 4"
        )
        conn.exec_driver_sql(
            f"CREATE TABLE {state}_subscription_state (subscription_name varchar, "
            "partition int, position int, PRIMARY KEY (subscription_name, partition))"
        )
    args = (
        "migrate",
        "--dsn",
        dsn,
        "--store",
        store_name,
        "--stream",
        stream_name,
        "--subscription",
        state,
        "--apply",
    )
    for _ in range(2):
        result = run(*args)
        assert result.returncode == 0, result.stderr
        assert result.stdout == (
            f"migrated store {store_name}, aggregated stream {stream_name}, "
            f"subscription state {state}\n"
        )
    assert _scalar(engine, f"SELECT obj_description('{msgs}'::regclass)") == SCHEMA_VERSION
    assert _scalar(engine, f"SELECT obj_description('{agg}'::regclass)") == SCHEMA_VERSION
    assert _scalar(engine, f"SELECT to_regclass('depeche_subscriptions_{state}')::text") == (
        f"depeche_subscriptions_{state}"
    )
    assert sa_rows(engine, f"SELECT partition, max_position FROM {agg}_maxpos") == [(0, 3)]
    assert (
        _scalar(
            engine,
            f"SELECT count(*) FROM {agg} AS a JOIN {msgs} AS m USING (message_id) "
            "WHERE a.origin_stream_global_position = m.global_position "
            "AND a.origin_stream_added_at = m.added_at",
        )
        == 4
    )

    projected = run(
        "project",
        "--dsn",
        dsn,
        "--store",
        store_name,
        "--stream",
        stream_name,
        "--wildcard",
        "acc-%",
        "--partitioner",
        "hash-mod:1",
        "--once",
        "--log-format",
        "json",
    )
    assert projected.returncode == 0, projected.stderr
    rows = check_invariants(engine, store_name, stream_name, "acc-%")
    assert [(r[3], r[4]) for r in rows] == [(0, p) for p in range(6)]


def test_backlog_counts_from_the_lowest_cursor_of_the_configured_wildcards_in_both_layouts(
    store: Store, stream_name: str, engine: sa.Engine, dsn: str, tmp_path: Path, run: Run
) -> None:
    store.aggregated_stream(stream_name, StreamHashPartitioner(2), ["acc-%", "card-%"])
    _write(store, streams=2, per_stream=5)  # global positions 1-10
    _write(store, streams=2, per_stream=5, prefix="card")  # 11-20
    _write(store, streams=1, per_stream=4, prefix="other")  # 21-24, never counted
    cursor = f"depeche_stream_{stream_name}_cursor"
    config = tmp_path / "streams.toml"
    config.write_text(
        f'[[streams]]\nstore = "{store.name}"\nstream = "{stream_name}"\n'
        'wildcards = ["acc-%", "card-%"]\n'
    )

    def backlog() -> int:
        result = run("status", "--dsn", dsn, "--store", store.name, "--config", str(config),
                     "--json")  # fmt: skip
        assert result.returncode == 0, result.stderr
        [shown] = json.loads(result.stdout)["aggregated_streams"]
        return int(shown["backlog"])

    def cursors(*rows: tuple[str, int]) -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DELETE FROM {cursor}")
            for wildcard, position in rows:
                conn.exec_driver_sql(
                    f"INSERT INTO {cursor} (wildcard, global_position) VALUES (%s, %s)",
                    (wildcard, position),
                )

    # One cursor per wildcard: a configured wildcard without one is at 0.
    assert backlog() == 20
    cursors(("acc-%", 6))
    assert backlog() == 20
    cursors(("acc-%", 6), ("card-%", 15))
    assert backlog() == 14  # above 6: acc 7-10, card 11-20
    cursors(("acc-%", 18), ("card-%", 15), ("gone-%", 2))  # not configured: ignored
    assert backlog() == 5  # above 15: card 16-20

    # One row for every wildcard (the layout before).
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {cursor} CASCADE")
        conn.exec_driver_sql(
            f"CREATE TABLE {cursor} (id integer PRIMARY KEY CHECK (id = 1), "
            "global_position bigint NOT NULL, snapshot pg_snapshot, "
            "updated_at timestamptz NOT NULL DEFAULT now())"
        )
    assert backlog() == 20
    with engine.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO {cursor} (id, global_position) VALUES (1, 12)")
    assert backlog() == 8

    # No cursor table (a depeche-db layout): everything not projected.
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {cursor} CASCADE")
    assert backlog() == 20


def test_an_older_registry_gains_the_stuck_columns_once_even_with_concurrent_starts(
    dsn: str, suffix: str
) -> None:
    schema = f"reg_{suffix}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        scoped = psycopg.conninfo.make_conninfo(dsn, options=f"-c search_path={schema}")
        with psycopg.connect(scoped, autocommit=True) as conn:
            # The registry as the first release created it, with a row.
            conn.execute(
                "CREATE TABLE depeche_rs_projectors (stream text PRIMARY KEY, store text NOT "
                "NULL, wildcards text[] NOT NULL, partitioner text NOT NULL, batch_size integer "
                "NOT NULL, registered_by text NOT NULL, updated_at timestamptz NOT NULL "
                "DEFAULT now())"
            )
            conn.execute(
                "INSERT INTO depeche_rs_projectors VALUES ('agg', 'st', '{acc-%}', "
                "'stream-hash', 1000, 'old', now())"
            )
            # `status` reads it as it is.
            [old] = _catalog.registrations(conn)
            assert (old.stream, old.wildcards, old.stuck) == ("agg", ("acc-%",), None)

        errors: list[BaseException] = []
        barrier = threading.Barrier(6)

        def start() -> None:
            try:
                with psycopg.connect(scoped, autocommit=True) as conn:
                    barrier.wait()
                    _catalog.ensure_registry(conn)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=start) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []

        with psycopg.connect(scoped, autocommit=True) as conn:
            columns = _catalog.table_columns(conn, "depeche_rs_projectors")
            assert {c for c in columns if c.startswith("stuck_")} == {
                "stuck_kind",
                "stuck_error",
                "stuck_since",
                "stuck_message_id",
                "stuck_origin_stream",
                "stuck_origin_version",
                "stuck_global_position",
            }
            _catalog.ensure_registry(conn)  # a no-op now
            stuck = _catalog.Stuck("PoisonMessageError", "unreadable", origin_stream="acc-1")
            _catalog.mark_stuck(conn, "agg", stuck)
            [marked] = _catalog.registrations(conn)
            assert marked.stuck is not None and marked.stuck.since is not None
            assert (marked.stuck.kind, marked.stuck.origin_stream) == (
                "PoisonMessageError",
                "acc-1",
            )
            # The same cause again (a standby taking over): it is stuck since the first time.
            _catalog.mark_stuck(conn, "agg", stuck)
            [again] = _catalog.registrations(conn)
            assert again.stuck is not None and again.stuck.since == marked.stuck.since
            assert _catalog.clear_stuck(conn, "agg") is True
            assert _catalog.clear_stuck(conn, "agg") is False
            [cleared] = _catalog.registrations(conn)
            assert (cleared.stream, cleared.registered_by, cleared.stuck) == ("agg", "old", None)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_migrate_reset_cursors_projects_rows_restored_with_triggers_disabled(
    store: Store, stream_name: str, engine: sa.Engine, dsn: str, run: Run
) -> None:
    """A data-only restore with triggers (and our check) disabled can bring rows whose
    `tx` comes from another cluster below the cursor; `--reset-cursors` is the remedy the
    docs name, and it re-projects nothing twice."""
    stream = store.aggregated_stream(stream_name, StreamHashPartitioner(2), ["acc-%"])
    _write(store, streams=3, per_stream=2)
    assert stream.projector.update_full().n_updated_messages == 6
    msgs = f"depeche_msgs_{store.name}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {msgs} DISABLE TRIGGER depeche_rs_stamp_tx")
        conn.exec_driver_sql(f"ALTER TABLE {msgs} DROP CONSTRAINT depeche_rs_tx_is_local")
        conn.exec_driver_sql(
            f"INSERT INTO {msgs} (message_id, stream, version, message, occurred_at, "
            "global_position, tx) VALUES (gen_random_uuid(), 'acc-restored', 1, '{}', now(), "
            "0, '3')"
        )
        conn.exec_driver_sql(f"ALTER TABLE {msgs} ENABLE ALWAYS TRIGGER depeche_rs_stamp_tx")
    # Its position and its forged id are both below the cursor: invisible to the probe.
    assert stream.projector.update_full().n_updated_messages == 0

    result = run(
        "migrate", "--dsn", dsn, "--store", store.name, "--stream", stream_name,
        "--reset-cursors", "--apply",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert _scalar(engine, f"SELECT count(*) FROM depeche_stream_{stream_name}_cursor") == 0
    assert (
        _scalar(
            engine,
            f"SELECT count(*) FROM pg_constraint WHERE conname = 'depeche_rs_tx_is_local' "
            f"AND conrelid = '{msgs}'::regclass",
        )
        == 1
    )  # the migration put the check back
    assert stream.projector.update_full().n_updated_messages == 1
    rows = check_invariants(engine, store.name, stream_name, "acc-%")
    assert len(rows) == 7


def test_status_ignores_depeche_db_014_side_tables_under_our_prefixes(
    store: Store, stream_name: str, engine: sa.Engine, dsn: str, run: Run
) -> None:
    """depeche-db 0.14 adds `depeche_stream_<agg>_omax` (with an `origin_stream` column)
    and `depeche_msgs_<store>_meta`; neither is an aggregated stream or a store."""
    stream = store.aggregated_stream(stream_name, StreamHashPartitioner(2), ["acc-%"])
    _write(store, streams=2, per_stream=2)
    assert stream.projector.update_full() == (4, False)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE TABLE depeche_stream_{stream_name}_omax (origin_stream varchar(255) "
            "PRIMARY KEY, max_aggregated_origin_global_position bigint NOT NULL)"
        )
        conn.exec_driver_sql(
            f"CREATE TABLE depeche_msgs_{store.name}_meta (stream varchar(255) PRIMARY KEY, "
            "min_global_position bigint NOT NULL, max_global_position bigint NOT NULL)"
        )
    result = run("status", "--dsn", dsn, "--store", store.name, "--json")
    assert result.returncode == 0, result.stderr
    assert f"{stream_name}_omax" not in result.stdout
    assert stream_name in result.stdout
    with psycopg.connect(dsn) as conn:
        assert _catalog.aggregated_streams(conn).count(stream_name) == 1
        assert f"{stream_name}_omax" not in _catalog.aggregated_streams(conn)
        assert f"{store.name}_meta" not in _catalog.stores(conn)


def test_status_warns_when_checkpoints_are_forced_by_wal_volume(
    store: Store, stream_name: str, dsn: str, run: Run
) -> None:
    # A manual CHECKPOINT counts as requested, as one forced by max_wal_size does. The
    # counters are the server's; resetting them is harmless on a test server.
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_stat_reset_shared('bgwriter')")
        for _ in range(3):
            admin.execute("CHECKPOINT")
        wal = admin.execute("SHOW max_wal_size").fetchone()
    assert wal is not None
    result = run("status", "--dsn", dsn, "--json")
    assert result.returncode == 0, result.stderr
    advice = json.loads(result.stdout)["server_settings"]
    forced = [a for a in advice if a["setting"] == "max_wal_size"]
    assert len(forced) == 1
    assert forced[0]["value"] == wal[0]
    assert re.match(
        r"3 of [34] checkpoints since .* were forced by WAL volume", forced[0]["finding"]
    )
    text = run("status", "--dsn", dsn)
    assert f"warning: max_wal_size = {wal[0]}: 3 of" in text.stdout
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_stat_reset_shared('bgwriter')")
    quiet = json.loads(run("status", "--dsn", dsn, "--json").stdout)["server_settings"]
    assert [a for a in quiet if a["setting"] == "max_wal_size"] == []


def test_buffers_advice_names_the_largest_stream_once_its_indexes_outgrow_the_cache() -> None:
    mib = 2**20
    assert buffers_advice("128MB", 128 * mib, {}) is None
    assert buffers_advice("128MB", 128 * mib, {"a": 100 * mib, "b": 128 * mib}) is None
    advice = buffers_advice("128MB", 128 * mib, {"a": 300 * mib, "b": 129 * mib})
    assert advice is not None
    assert (advice.setting, advice.value) == ("shared_buffers", "128MB")
    assert advice.finding.startswith("the primary key and position index of a take 300 MB")


def test_status_measures_the_indexes_of_each_aggregated_stream(
    store: Store, stream_name: str, dsn: str
) -> None:
    agg = store.aggregated_stream(stream_name, StreamHashPartitioner(2), ["acc-%"])
    _write(store, streams=3, per_stream=2)
    assert agg.projector.update_full() == (6, False)
    with psycopg.connect(dsn) as conn:
        measured = _server_settings._index_bytes(conn, stream_name)
        expected = conn.execute(
            "SELECT pg_relation_size(%s::regclass) + pg_relation_size(%s::regclass)",
            (f"depeche_stream_{stream_name}_pkey", f"depeche_stream_{stream_name}_uq"),
        ).fetchone()
    assert expected is not None and measured == expected[0] > 0
