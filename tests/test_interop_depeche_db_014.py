"""depeche-db 0.14.0rc1 and depeche-rs on the same tables.

depeche-db 0.14 adds two tables its projector reads to find work: the store's per-stream
`_meta` (kept by its row trigger) and each aggregated stream's per-origin-stream `_omax`
(kept by its projector). It runs in its own virtual environment (built on first use under
`.venv/depeche-db-0.14`, or the Python in `DEPECHE_RS_DEPECHE_DB_014_PYTHON`), driven as
a subprocess by `_depeche_db_014_driver.py`; depeche-db 0.13.1 runs in-process.

Every scenario ends with the whole outcome checked: each matching message projected
exactly once with gapless positions, both 0.14 tables equal to what the rows say, and
depeche-db 0.14's subscription delivering every projected message once.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import depeche_rs
from depeche_rs import AggregatedStream
from depeche_rs._cli import _args
from depeche_rs._connection import execute_script
from depeche_rs.tools import PydanticMessageSerializer, StreamNamePartitioner

from ._models import AnyEvent, Deposited
from ._operations import assert_projection
from .test_compat_matrix import _compat_matrix

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("_depeche_db_014_driver.py")
# depeche-db needs SQLAlchemy-Utils, which does not work with SQLAlchemy 2.1, and asyncer,
# which imports sniffio without requiring it (anyio no longer brings it).
REQUIREMENTS = [
    "depeche-db==0.14.0rc1",
    "sqlalchemy>=2.0,<2.1",
    "sniffio",
    "psycopg[binary]>=3.1",
    "pydantic>=2",
]
WILDCARDS = ["acc-%", "loan-%"]


@pytest.fixture(scope="session")
def python014() -> str:
    """A Python with depeche-db 0.14.0rc1 installed (never depeche_rs)."""
    given = os.environ.get("DEPECHE_RS_DEPECHE_DB_014_PYTHON")
    if given:
        return given
    venv = Path(sys.prefix) / "depeche-db-0.14"
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    if not marker.exists() or marker.read_text() != " ".join(REQUIREMENTS):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--pre", *REQUIREMENTS], check=True
        )
        marker.write_text(" ".join(REQUIREMENTS))
    return str(python)


class DepecheDb014:
    """depeche-db 0.14 on one store and aggregated stream, through the driver."""

    def __init__(self, python: str, dsn: str, store: str, agg: str) -> None:
        self.python, self.base = python, {"dsn": dsn, "store": store, "agg": agg}

    def __call__(self, op: str, **request: Any) -> Any:
        done = subprocess.run(
            [self.python, str(DRIVER), json.dumps({"op": op, **self.base, **request})],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert done.returncode == 0, f"depeche-db 0.14 {op} failed:\n{done.stderr}"
        return json.loads(done.stdout)

    def write(self, messages: list[tuple[str, int]]) -> list[int]:
        return self("write", messages=[[s, i, 1] for s, i in messages])  # type: ignore[no-any-return]

    def project(self, batches: int | None = None, batch_size: int = 10) -> int:
        return self(  # type: ignore[no-any-return]
            "project", wildcards=WILDCARDS, batches=batches, batch_size=batch_size
        )

    def subscribe(self, name: str) -> list[list[Any]]:
        return self("subscribe", wildcards=WILDCARDS, subscription=name)  # type: ignore[no-any-return]


@pytest.fixture()
def ddb14(python014: str, dsn: str, store_name: str, stream_name: str) -> DepecheDb014:
    return DepecheDb014(python014, dsn, store_name, stream_name)


def _rs(store_name: str, engine: sa.Engine) -> depeche_rs.MessageStore[AnyEvent]:
    return depeche_rs.MessageStore(store_name, engine, PydanticMessageSerializer(AnyEvent))


def _rs_stream(store: depeche_rs.MessageStore[AnyEvent], agg: str) -> AggregatedStream[AnyEvent]:
    return store.aggregated_stream(agg, StreamNamePartitioner(), WILDCARDS, update_batch_size=7)


def _messages(n: int, streams: int, start: int = 0) -> list[tuple[str, int]]:
    """`n` messages round-robin over `streams` streams, both prefixes and one ignored."""
    prefixes = ["acc", "loan", "other"]
    return [(f"{prefixes[i % 3]}-{i % streams}", start + i) for i in range(n)]


def _rs_write(store: depeche_rs.MessageStore[AnyEvent], messages: list[tuple[str, int]]) -> None:
    for stream, i in messages:
        store.write(stream, Deposited(account=i, amount=1))


def assert_0_14_tables(engine: sa.Engine, store: str, agg: str, omax_too: bool = True) -> None:
    """depeche-db 0.14's `_meta` (and `_omax`) say exactly what the rows say."""
    with engine.connect() as conn:
        meta = conn.exec_driver_sql(
            f"SELECT stream, min_global_position, max_global_position "
            f"FROM depeche_msgs_{store}_meta ORDER BY stream"
        ).all()
        truth = conn.exec_driver_sql(
            f"SELECT stream, min(global_position), max(global_position) "
            f"FROM depeche_msgs_{store} GROUP BY stream ORDER BY stream"
        ).all()
        assert meta == truth
        if not omax_too:
            return
        omax = conn.exec_driver_sql(
            f"SELECT origin_stream, max_aggregated_origin_global_position "
            f"FROM depeche_stream_{agg}_omax ORDER BY origin_stream"
        ).all()
        truth = conn.exec_driver_sql(
            f"SELECT origin_stream, max(origin_stream_global_position) "
            f"FROM depeche_stream_{agg} GROUP BY origin_stream ORDER BY origin_stream"
        ).all()
        assert omax == truth


def assert_delivered_once(engine: sa.Engine, agg: str, seen: list[list[Any]]) -> None:
    """A depeche-db 0.14 subscription delivered every projected row once, in order."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            f"SELECT partition, position, message_id::text FROM depeche_stream_{agg} "
            "ORDER BY partition, position"
        ).all()
    assert sorted(map(tuple, seen)) == [tuple(r) for r in rows]
    for partition in {p for p, _, _ in seen}:
        positions = [pos for p, pos, _ in seen if p == partition]
        assert positions == sorted(positions)


def _store_triggers(engine: sa.Engine, store: str) -> list[str]:
    with engine.connect() as conn:
        return sorted(
            r[0]
            for r in conn.exec_driver_sql(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal",
                (f"depeche_msgs_{store}",),
            )
        )


def _listen(dsn: str, channel: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(f"LISTEN {channel}")
    return conn


def _notified(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    got = [json.loads(n.payload) for n in conn.notifies(timeout=1.0, stop_after=None)]
    conn.close()
    return got


def test_the_issue_sequence_loses_and_duplicates_nothing(
    ddb14: DepecheDb014, dsn: str, engine: sa.Engine, store_name: str, stream_name: str
) -> None:
    # depeche-db 0.14 writes 400 over 45 streams and projects half of them.
    ddb14.write(_messages(400, 45))
    assert ddb14.project(batches=12, batch_size=10) == 120
    # depeche-rs continues: projects the rest, writes 200, projects.
    rs = _rs(store_name, engine)
    stream = _rs_stream(rs, stream_name)
    matching_400 = sum(1 for s, _ in _messages(400, 45) if not s.startswith("other"))
    assert stream.projector.update_full().n_updated_messages == matching_400 - 120
    _rs_write(rs, _messages(200, 45, start=400))
    stream.projector.update_full()
    assert_0_14_tables(engine, store_name, stream_name)
    # depeche-db 0.14 writes 100 more and projects them: none lost, none twice.
    listener = _listen(dsn, f"depeche_{store_name}_messages")
    positions = ddb14.write(_messages(100, 45, start=600))
    # One notification per message, depeche-db's payload, in order (its row trigger
    # was replaced by ours; it must not send a second one).
    assert [n["global_position"] for n in _notified(listener)] == positions
    assert ddb14.project() == sum(1 for s, _ in _messages(100, 45) if not s.startswith("other"))
    assert_projection(engine, store_name, stream_name, WILDCARDS)
    assert_0_14_tables(engine, store_name, stream_name)
    # Nothing left for either projector, and its subscription delivers everything once.
    assert ddb14.project() == 0
    assert stream.projector.update_full() == (0, False)
    assert_delivered_once(engine, stream_name, ddb14.subscribe("sub_" + stream_name))


def test_depeche_rs_creates_depeche_db_014_joins_both_project_in_turns(
    ddb14: DepecheDb014, engine: sa.Engine, store_name: str, stream_name: str
) -> None:
    # depeche-rs creates store and stream (no 0.14 tables yet) and half-projects.
    rs = _rs(store_name, engine)
    stream = _rs_stream(rs, stream_name)
    _rs_write(rs, _messages(90, 20))
    assert stream.projector.update_batch().n_updated_messages == 7
    # depeche-db 0.14 opens them: creates its tables from the rows, writes, projects.
    ddb14.write(_messages(60, 25, start=90))
    assert_0_14_tables(engine, store_name, stream_name, omax_too=False)
    ddb14.project(batches=3, batch_size=5)
    # Turns: depeche-rs writes and projects one batch, 0.14 writes and projects one.
    for turn in range(4):
        _rs_write(rs, _messages(15, 30, start=200 + 30 * turn))
        stream.projector.update_batch()
        ddb14.write(_messages(15, 30, start=215 + 30 * turn))
        ddb14.project(batches=1, batch_size=5)
        assert_0_14_tables(engine, store_name, stream_name)
    stream.projector.update_full()
    ddb14.project()
    assert_projection(engine, store_name, stream_name, WILDCARDS)
    assert_0_14_tables(engine, store_name, stream_name)
    assert_delivered_once(engine, stream_name, ddb14.subscribe("sub_" + stream_name))
    # depeche-rs never needed depeche-db's row trigger back.
    assert "depeche_storage_new_msg_" + store_name not in _store_triggers(engine, store_name)


def test_depeche_rs_migration_brings_a_0_13_database_to_0_14(
    ddb14: DepecheDb014, engine: sa.Engine, store_name: str, stream_name: str
) -> None:
    depeche_db = pytest.importorskip("depeche_db", reason="the test extra installs 0.13.1")
    db_tools = pytest.importorskip("depeche_db.tools")
    # A depeche-db 0.13.1 database, half-projected by 0.13.1.
    old = depeche_db.MessageStore(store_name, engine, db_tools.PydanticMessageSerializer(AnyEvent))
    for stream, i in _messages(120, 30):
        old.write(stream, Deposited(account=i, amount=1))
    old_stream = old.aggregated_stream(
        name=stream_name,
        partitioner=db_tools.StreamNamePartitioner(),
        stream_wildcards=WILDCARDS,
        update_batch_size=10,
    )
    old_stream.projector.update_full()
    for stream, i in _messages(30, 30, start=120):
        old.write(stream, Deposited(account=i, amount=1))
    # depeche-rs's 0.14 migration: our layout and depeche-db 0.14's tables, exact.
    with engine.begin() as conn:
        execute_script(conn, AggregatedStream.get_migration_ddl_0_14_0(stream_name, store_name))
    assert_0_14_tables(engine, store_name, stream_name)
    # depeche-db 0.14 finds the 30 unprojected messages, writes and projects more.
    ddb14.write(_messages(30, 30, start=150))
    assert ddb14.project() == sum(
        1 for s, _ in _messages(30, 30) + _messages(30, 30) if not s.startswith("other")
    )
    rs = _rs(store_name, engine)
    assert _rs_stream(rs, stream_name).projector.update_full() == (0, False)
    assert_projection(engine, store_name, stream_name, WILDCARDS)
    assert_0_14_tables(engine, store_name, stream_name)


def test_depeche_db_014_migration_on_depeche_rs_tables_keeps_our_upkeep(
    ddb14: DepecheDb014, dsn: str, engine: sa.Engine, store_name: str, stream_name: str
) -> None:
    # depeche-rs tables with history, then depeche-db 0.14's own 0.13 -> 0.14 script.
    rs = _rs(store_name, engine)
    stream = _rs_stream(rs, stream_name)
    _rs_write(rs, _messages(80, 20))
    stream.projector.update_full()
    _rs_write(rs, _messages(20, 20, start=80))
    triggers = _store_triggers(engine, store_name)
    script = ddb14("migrate", **{"from": "0.13"})
    assert "CREATE OR REPLACE FUNCTION depeche_storage_new_msg_" in script
    # It replaced its trigger function's body, but that function is attached to nothing:
    # our triggers stay, and keep its tables for every writer and projector.
    assert _store_triggers(engine, store_name) == triggers
    assert_0_14_tables(engine, store_name, stream_name)
    listener = _listen(dsn, f"depeche_{store_name}_messages")
    positions = ddb14.write(_messages(40, 25, start=100))
    _rs_write(rs, _messages(40, 25, start=140))
    assert len(_notified(listener)) == 80
    assert positions == sorted(positions)
    ddb14.project(batches=2, batch_size=10)
    stream.projector.update_full()
    ddb14.project()
    assert_projection(engine, store_name, stream_name, WILDCARDS)
    assert_0_14_tables(engine, store_name, stream_name)
    # Running our migration again on the shared database changes nothing.
    with engine.begin() as conn:
        execute_script(conn, AggregatedStream.get_migration_ddl_0_14_0(stream_name, store_name))
    assert_0_14_tables(engine, store_name, stream_name)
    assert_delivered_once(engine, stream_name, ddb14.subscribe("sub_" + stream_name))


def test_the_migration_repairs_0_14_tables_left_behind(
    ddb14: DepecheDb014, engine: sa.Engine, store_name: str, stream_name: str
) -> None:
    """Tables depeche-db 0.14 filled while a write committed (its fill has no lock), or
    left by a truncate, are set right by `migrate --depeche-db-0.14`."""
    rs = _rs(store_name, engine)
    stream = _rs_stream(rs, stream_name)
    _rs_write(rs, _messages(50, 10))
    ddb14.project()
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DELETE FROM depeche_msgs_{store_name}_meta WHERE stream = 'acc-0'")
        conn.exec_driver_sql(
            f"UPDATE depeche_stream_{stream_name}_omax "
            "SET max_aggregated_origin_global_position = 1"
        )
        conn.exec_driver_sql(f"INSERT INTO depeche_msgs_{store_name}_meta VALUES ('gone-1', 1, 2)")
    parser = _cli_parser()
    args = parser.parse_args(
        ["migrate", "--store", store_name, "--stream", stream_name, "--depeche-db-0.14"]
    )
    from depeche_rs._cli._migrate import migration_script

    script = migration_script(args.store, args.stream, [], depeche_db_0_14=args.depeche_db_0_14)
    with engine.begin() as conn:
        execute_script(conn, script)
    assert_0_14_tables(engine, store_name, stream_name)
    assert ddb14.project() == 0
    assert stream.projector.update_full() == (0, False)
    assert_projection(engine, store_name, stream_name, WILDCARDS)


def _cli_parser() -> Any:
    import argparse

    parser = argparse.ArgumentParser()
    _args.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_generate_migration_script_prints_each_version_step(
    store_name: str, stream_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from depeche_rs.__main__ import main

    assert (
        main(
            [
                "generate-migration-script",
                "0.13",
                "0.14",
                "--message-store",
                store_name,
                "--aggregated-stream",
                stream_name,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("-- Migration for version: 0.14\n")
    assert "-- Migration for version: 0.11" not in out
    assert f"CREATE TABLE IF NOT EXISTS depeche_msgs_{store_name}_meta" in out
    assert f"CREATE TABLE IF NOT EXISTS depeche_stream_{stream_name}_omax" in out


def test_the_api_offers_what_depeche_db_014_code_uses(
    ddb14: DepecheDb014, engine: sa.Engine, store_name: str, stream_name: str
) -> None:
    """Every public name of depeche-db 0.14's modules (and `_timings.Timings`,
    `_aggregated_stream.FullUpdateResult`) exists at the same path here and accepts
    the same parameters, but for those the compatibility matrix leaves out on purpose."""
    theirs = ddb14("signatures")
    on_purpose = _compat_matrix().MISSING_ON_PURPOSE  # listed with reasons, as for 0.13.1
    missing, different = [], []
    for path, names in theirs.items():
        ours = importlib.import_module("depeche_rs" + path[len("depeche_db") :])
        for name, params in names.items():
            if not hasattr(ours, name):
                if f"{path}.{name}" not in on_purpose:
                    missing.append(f"{path}.{name}")
                continue
            obj = getattr(ours, name)
            target = obj.__init__ if isinstance(obj, type) else obj
            try:
                ours_params = inspect.signature(target).parameters
            except (TypeError, ValueError):
                continue
            takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in ours_params.values())
            if params is not None and not takes_kwargs and not set(params) <= set(ours_params):
                different.append(f"{path}.{name}: {sorted(set(params) - set(ours_params))}")
    assert not missing
    assert not different
    # Timings as depeche-db 0.14 code uses it: attached to the projector, opt-in.
    from depeche_rs._timings import Timings

    rs = _rs(store_name, engine)
    stream = _rs_stream(rs, stream_name)
    assert isinstance(stream.projector.timings, Timings)
    assert not stream.projector.timings.enabled
    stream.projector.timings = Timings(enabled=True)
    _rs_write(rs, _messages(10, 5))
    assert stream.projector.update_full().n_updated_messages == 7
    samples = stream.projector.timings.samples
    # Messages written by us with the built-in partitioner never call into Python.
    assert {name: len(times) for name, times in samples.items()} == {"update_full": 1}
    assert set(AggregatedStream.migration_script_generators()) == {(0, 8), (0, 11), (0, 14)}
