"""`depeche-rs project` as a subprocess against real PostgreSQL: catch-up then live,
clean stops, hot standby, killed connections, metrics."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from depeche_rs import MessageStore
from depeche_rs.__main__ import main

from ._helpers import check_invariants, projected_rows, sha_partition
from ._models import AccountCreated, AnyEvent, Deposited
from .test_cli_harness import Command, commands, forget_registrations, scrape

Store = MessageStore[AnyEvent]
Cli = Callable[..., Command]


@pytest.fixture()
def cli(dsn: str, stream_name: str) -> Iterator[Cli]:
    yield from commands()
    forget_registrations(dsn, stream_name)


def _write(store: Store, streams: int, per_stream: int, prefix: str = "acc") -> None:
    for i in range(streams):
        store.write_many(
            f"{prefix}-{i}", [Deposited(account=i, amount=j) for j in range(per_stream)]
        )


def _count(engine: sa.Engine, agg: str) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(f"SELECT count(*) FROM depeche_stream_{agg}").scalar_one())


def _wait_count(engine: sa.Engine, agg: str, n: int, timeout: float = 10.0) -> float:
    """Seconds until the aggregated stream holds `n` rows."""
    started = time.monotonic()
    while _count(engine, agg) != n:
        assert time.monotonic() - started < timeout, f"{_count(engine, agg)} rows, not {n}"
        time.sleep(0.01)
    return time.monotonic() - started


def _project(dsn: str, store: str, agg: str, *extra: str) -> list[str]:
    return [
        "project",
        "--dsn",
        dsn,
        "--store",
        store,
        "--stream",
        agg,
        "--wildcard",
        "acc-%",
        "--log-format",
        "json",
        *extra,
    ]


def test_catches_up_then_projects_a_new_message_within_a_second(
    store: Store, stream_name: str, engine: sa.Engine, dsn: str, cli: Cli
) -> None:
    _write(store, streams=20, per_stream=25)
    _write(store, streams=3, per_stream=5, prefix="other")
    # A long poll interval: the live message must come through NOTIFY, not the poll.
    p = cli(
        *_project(dsn, store.name, stream_name, "--partitioner", "stream-hash"),
        "--batch-size",
        "100",
        "--poll-interval",
        "60",
    )
    assert p.wait_for("catching_up")["backlog"] == 500
    assert p.wait_for("caught_up")["projected"] == 500
    rows = check_invariants(engine, store.name, stream_name, "acc-%")
    assert len(rows) == 500
    assert all(r[3] == sha_partition(r[1]) for r in rows)

    store.write("acc-new", AccountCreated(account=99))
    took = _wait_count(engine, stream_name, 501, timeout=5)
    assert took < 1.0, f"the live message took {took:.2f} s"

    assert p.stop(signal.SIGTERM) == 0
    assert [e["event"] for e in p.events[-2:]] == ["stopping", "stopped"]
    assert p.events[-1]["projected"] == 501
    check_invariants(engine, store.name, stream_name, "acc-%")


def test_sigterm_during_catch_up_leaves_whole_batches_and_a_restart_finishes(
    store: Store, stream_name: str, engine: sa.Engine, dsn: str, cli: Cli
) -> None:
    _write(store, streams=20, per_stream=20)
    args = _project(
        dsn,
        store.name,
        stream_name,
        "--partitioner",
        "tests.test_cli_app:SlowPartitioner",
        "--batch-size",
        "20",
    )
    p = cli(*args)
    p.wait_for("catching_up")
    _wait_until(lambda: _count(engine, stream_name) >= 60)
    assert p.stop(signal.SIGTERM, timeout=5) == 0
    assert p.named("stopping", signal="SIGTERM")
    assert not p.named("stopped", abandoned=True)

    rows = projected_rows(engine, stream_name)
    assert 60 <= len(rows) < 400
    assert len(rows) % 20 == 0, "a batch was cut"
    with engine.connect() as conn:
        first = conn.exec_driver_sql(
            f"SELECT message_id FROM depeche_msgs_{store.name} ORDER BY global_position LIMIT %s",
            (len(rows),),
        ).scalars()
        assert {r[0] for r in rows} == set(first)
    for partition in {r[3] for r in rows}:
        positions = [r[4] for r in rows if r[3] == partition]
        assert positions == list(range(len(positions)))

    again = cli(*args, "--once")
    assert again.wait(timeout=20) == 0
    assert again.wait_for("caught_up")["projected"] == 400 - len(rows)
    rows = check_invariants(engine, store.name, stream_name, "acc-%")
    assert len(rows) == 400
    assert all(r[3] == int(r[1].split("-")[1]) % 3 for r in rows)


def test_a_batch_still_running_after_the_stop_timeout_is_abandoned_whole(
    store: Store, stream_name: str, engine: sa.Engine, dsn: str, cli: Cli
) -> None:
    _write(store, streams=2, per_stream=3)
    p = cli(
        *_project(
            dsn,
            store.name,
            stream_name,
            "--partitioner",
            "tests.test_cli_app:StuckPartitioner",
            "--stop-timeout",
            "0.5",
        )
    )
    p.wait_for("catching_up")
    # Inside the batch: its transaction is open while the partitioner sleeps for 30 s.
    _wait_until(lambda: _in_transaction(dsn, stream_name))
    started = time.monotonic()
    assert p.stop(signal.SIGTERM, timeout=10) == 0
    assert time.monotonic() - started < 5
    stopped = p.wait_for("stopped")
    assert stopped["abandoned"] is True and stopped["status"] == 0
    assert _count(engine, stream_name) == 0
    with engine.connect() as conn:
        assert (
            conn.exec_driver_sql(
                f"SELECT count(*) FROM depeche_stream_{stream_name}_maxpos"
            ).scalar_one()
            == 0
        )


def test_standby_takes_over_when_the_active_instance_is_killed(
    store: Store,
    stream_name: str,
    engine: sa.Engine,
    dsn: str,
    cli: Cli,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _write(store, streams=10, per_stream=30)
    args = _project(
        dsn,
        store.name,
        stream_name,
        "--partitioner",
        "hash-mod:4",
        "--batch-size",
        "20",
        "--poll-interval",
        "0.2",
    )
    active = cli(*args)
    assert active.wait_for("active")["took_over"] is False
    active.wait_for("caught_up")
    standby = cli(*args)
    held = standby.wait_for("standby")
    active_name = f"depeche-rs project {socket.gethostname()} {active.pid}"[:63]
    assert held["holder"] == active_name
    assert not standby.named("active")
    assert main(["status", "--dsn", dsn, "--store", store.name, "--json"]) == 0
    [shown] = json.loads(capsys.readouterr().out)["aggregated_streams"]
    assert shown["projector"]["application_name"] == active_name

    def writer() -> None:
        for i in range(60):
            _write(store, streams=1, per_stream=5, prefix=f"acc-w{i}")
            time.sleep(0.02)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.5)
        active.proc.kill()
        assert active.wait() == -signal.SIGKILL
        took_over = standby.wait_for("active", timeout=5)
        assert took_over["took_over"] is True
    finally:
        thread.join()
    _wait_count(engine, stream_name, 600)
    rows = check_invariants(engine, store.name, stream_name, "acc-%")
    assert len(rows) == 600
    assert standby.stop() == 0


def test_connections_terminated_mid_batch_are_reconnected_and_nothing_is_lost(
    store: Store, stream_name: str, engine: sa.Engine, dsn: str, cli: Cli, tmp_path: Any
) -> None:
    _write(store, streams=5, per_stream=20)
    gate = tmp_path / "gate"
    gate.touch()
    p = cli(
        *_project(dsn, store.name, stream_name, "--partitioner",
                  "tests.test_cli_app:GatedPartitioner", "--batch-size", "30",
                  "--poll-interval", "0.2"),
        env={"DEPECHE_RS_TEST_GATE": str(gate)},
    )  # fmt: skip
    projector = f"depeche-rs projector depeche_stream_{stream_name}"
    control = f"depeche-rs project {socket.gethostname()} {p.pid}"[:63]
    # The first batch holds its transaction open while the partitioner waits.
    _wait_until(lambda: _in_transaction(dsn, stream_name))
    with psycopg.connect(dsn, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT application_name, pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name IN (%s, %s) ORDER BY 1",
            (control, projector),
        ).fetchall()
    assert killed == [(control, True), (projector, True)]
    gate.unlink()
    lost = p.wait_for("connection_lost", stream=stream_name)
    assert lost["sqlstate"] in (None, "57P01")
    assert p.wait_for("reconnected", connection=stream_name)["seconds"] > 0
    assert p.wait_for("reconnected", connection="listen")["seconds"] > 0
    _write(store, streams=2, per_stream=10, prefix="acc-after")
    _wait_count(engine, stream_name, 120)
    check_invariants(engine, store.name, stream_name, "acc-%")
    assert p.stop() == 0


def _series(scraped: dict[str, Any], name: str, **labels: str) -> float:
    return float(scraped["samples"][(name, tuple(labels.items()))])


def test_metrics_endpoint_serves_prometheus_text_with_moving_counters(
    store: Store, stream_name: str, engine: sa.Engine, dsn: str, cli: Cli
) -> None:
    _write(store, streams=6, per_stream=20)
    before = time.time()
    p = cli(
        *_project(
            dsn,
            store.name,
            stream_name,
            "--partitioner",
            "hash-mod:2",
            "--batch-size",
            "50",
            "--metrics-port",
            "0",
            "--poll-interval",
            "0.2",
        )
    )
    port = int(p.wait_for("metrics")["port"])
    p.wait_for("caught_up")
    m = scrape(port)
    assert m["types"] == {
        "depeche_rs_projected_messages_total": "counter",
        "depeche_rs_backlog_messages": "gauge",
        "depeche_rs_batch_duration_seconds": "histogram",
        "depeche_rs_last_batch_timestamp_seconds": "gauge",
        "depeche_rs_lock_holder": "gauge",
        "depeche_rs_reconnects_total": "counter",
        "depeche_rs_stuck": "gauge",
    }
    s = stream_name
    assert _series(m, "depeche_rs_projected_messages_total", stream=s) == 120
    assert _series(m, "depeche_rs_backlog_messages", stream=s) == 0
    assert _series(m, "depeche_rs_lock_holder", stream=s) == 1
    assert _series(m, "depeche_rs_stuck", stream=s) == 0
    assert _series(m, "depeche_rs_reconnects_total", connection="listen") == 0
    assert before <= _series(m, "depeche_rs_last_batch_timestamp_seconds", stream=s) <= time.time()
    count = _series(m, "depeche_rs_batch_duration_seconds_count", stream=s)
    assert count == 3  # 50 + 50 + 20
    # Label order within a sample carries no meaning (prometheus_client puts `le` first).
    buckets = [
        (dict(labels)["le"], value)
        for (name, labels), value in m["samples"].items()
        if name == "depeche_rs_batch_duration_seconds_bucket" and dict(labels)["stream"] == s
    ]
    assert buckets[-1] == ("+Inf", count)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert _series(m, "depeche_rs_batch_duration_seconds_sum", stream=s) > 0

    _write(store, streams=1, per_stream=7, prefix="acc-more")
    _wait_until(
        lambda: _series(scrape(port), "depeche_rs_projected_messages_total", stream=s) == 127
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (f"depeche-rs project {socket.gethostname()} {p.pid}"[:63],),
        )
    p.wait_for("reconnected", connection="listen")
    m = scrape(port)
    assert _series(m, "depeche_rs_reconnects_total", connection="listen") == 1
    assert _series(m, "depeche_rs_batch_duration_seconds_count", stream=s) == 4
    assert p.stop() == 0


def test_metrics_port_without_prometheus_client_says_what_to_install(
    store: Store, stream_name: str, dsn: str
) -> None:
    # prometheus_client is the optional `metrics` extra: hide it as if it were not installed.
    code = (
        "import sys; sys.modules['prometheus_client'] = None; "
        "from depeche_rs.__main__ import main; sys.exit(main(sys.argv[1:]))"
    )
    args = _project(
        dsn, store.name, stream_name, "--partitioner", "hash-mod:2", "--metrics-port", "0"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
        )
    finally:
        forget_registrations(dsn, stream_name)
    assert done.returncode == 1, done.stderr
    errors = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    errors += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    messages = [e["message"] for e in errors if e.get("event") == "error"]
    assert messages == [
        "cannot serve metrics on 0.0.0.0:0: serving metrics needs prometheus_client: "
        "pip install 'depeche-rs[metrics]'"
    ]


def test_a_config_file_projects_several_streams_in_one_process(
    store: Store, stream_name: str, engine: sa.Engine, dsn: str, cli: Cli, tmp_path: Any
) -> None:
    _write(store, streams=4, per_stream=5)
    config = tmp_path / "projectors.toml"
    config.write_text(
        f'dsn = "{dsn}"\n'
        "batch_size = 7\n"
        "[[streams]]\n"
        f'store = "{store.name}"\n'
        f'stream = "{stream_name}_by_hash"\n'
        'wildcards = ["acc-%"]\n'
        'partitioner = "hash-mod:2"\n'
        "[[streams]]\n"
        f'store = "{store.name}"\n'
        f'stream = "{stream_name}_by_account"\n'
        'wildcards = ["acc-1", "acc-3"]\n'
        'partitioner = "tests.test_cli_app:AccountPartitioner"\n'
        'serializer = "tests.test_cli_app:serializer"\n'
    )
    p = cli("project", "--config", str(config), "--log-format", "json", "--once")
    assert p.wait() == 0
    caught = {e["stream"]: e["projected"] for e in p.named("caught_up")}
    assert caught == {f"{stream_name}_by_hash": 20, f"{stream_name}_by_account": 10}
    check_invariants(engine, store.name, f"{stream_name}_by_hash", "acc-%")
    rows = projected_rows(engine, f"{stream_name}_by_account")
    assert sorted((r[1], r[3]) for r in rows) == sorted([("acc-1", 1)] * 5 + [("acc-3", 0)] * 5)


def test_messages_written_without_a_time_take_it_from_their_json(
    store: Store, stream_name: str, engine: sa.Engine, dsn: str, cli: Cli
) -> None:
    # depeche-db's own write function records no message time.
    with engine.begin() as conn:
        for stream, body in [
            ("acc-1", '{"happened_at": "2024-03-01T10:00:00+02:00"}'),
            ("acc-2", '{"meta": {"at": 1700000000}}'),
            ("acc-3", '{"nothing": "here"}'),
        ]:
            conn.exec_driver_sql(
                f"SELECT depeche_write_message_{store.name}(gen_random_uuid(), %s, %s::json)",
                (stream, body),
            )
    p = cli(
        *_project(
            dsn,
            store.name,
            stream_name,
            "--partitioner",
            "stream-hash",
            "--time-field",
            "happened_at",
            "--time-field",
            "meta.at",
            "--once",
        )
    )
    assert p.wait() == 0
    with engine.connect() as conn:
        fallback = conn.exec_driver_sql(
            f"SELECT a.message_occurred_at = m.added_at FROM depeche_stream_{stream_name} AS a "
            f"JOIN depeche_msgs_{store.name} AS m USING (message_id) "
            "WHERE a.origin_stream = 'acc-3'"
        ).scalar_one()
        times = dict(
            conn.exec_driver_sql(
                f"SELECT origin_stream, message_occurred_at::text FROM depeche_stream_{stream_name}"
            ).all()
        )
    assert times["acc-1"] == "2024-03-01 08:00:00"
    assert times["acc-2"] == "2023-11-14 22:13:20"
    assert fallback is True  # no time in the JSON: when it was written


def _write_poison(engine: sa.Engine, store: str, stream: str) -> tuple[str, int, int]:
    """A message written as depeche-db writes (no message time) that the application's
    serializer cannot read: its id, version and global position."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"SELECT depeche_write_message_{store}(gen_random_uuid(), %s, "
            """'{"garbage": 1}'::json)""",
            (stream,),
        )
        row = conn.exec_driver_sql(
            f"SELECT message_id::text, version, global_position FROM depeche_msgs_{store} "
            "WHERE message ? 'garbage'"
        ).one()
    return str(row[0]), int(row[1]), int(row[2])


def _status(dsn: str, store: str, capsys: pytest.CaptureFixture[str], *extra: str) -> Any:
    capsys.readouterr()
    code = main(["status", "--dsn", dsn, "--store", store, *extra])
    out = capsys.readouterr().out
    return code, (json.loads(out) if "--json" in extra else out)


def test_a_poisoned_stream_is_stuck_while_the_others_go_on_and_resumes_once_fixed(
    store: Store,
    stream_name: str,
    engine: sa.Engine,
    dsn: str,
    cli: Cli,
    tmp_path: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    poisoned, healthy = f"{stream_name}_x", f"{stream_name}_acc"
    _write(store, streams=3, per_stream=4, prefix="x")
    message_id, version, position = _write_poison(engine, store.name, "x-1")
    _write(store, streams=2, per_stream=3, prefix="x-after")
    _write(store, streams=4, per_stream=5)
    config = tmp_path / "projectors.toml"
    config.write_text(
        f'dsn = "{dsn}"\n'
        "[[streams]]\n"
        f'store = "{store.name}"\n'
        f'stream = "{poisoned}"\n'
        'wildcards = ["x-%"]\n'
        'partitioner = "stream-hash"\n'
        'serializer = "tests.test_cli_app:serializer"\n'
        "[[streams]]\n"
        f'store = "{store.name}"\n'
        f'stream = "{healthy}"\n'
        'wildcards = ["acc-%"]\n'
        'partitioner = "stream-hash"\n'
    )
    p = cli("project", "--config", str(config), "--log-format", "json",
            "--poll-interval", "0.2", "--metrics-port", "0")  # fmt: skip
    port = int(p.wait_for("metrics")["port"])
    stuck = p.wait_for("stuck", stream=poisoned)
    assert stuck["level"] == "error"
    assert (stuck["store"], stuck["kind"]) == (store.name, "PoisonMessageError")
    assert (stuck["origin_stream"], stuck["version"]) == ("x-1", version)
    assert (stuck["global_position"], stuck["message_id"]) == (position, message_id)
    assert f"UPDATE depeche_msgs_{store.name} SET occurred_at" in stuck["message"]
    assert p.wait_for("caught_up", stream=healthy)["projected"] == 20

    # The other stream keeps projecting live messages.
    store.write("acc-live", AccountCreated(account=99))
    _wait_count(engine, healthy, 21, timeout=5)
    m = scrape(port)
    assert _series(m, "depeche_rs_stuck", stream=poisoned) == 1
    assert _series(m, "depeche_rs_stuck", stream=healthy) == 0

    code, data = _status(dsn, store.name, capsys, "--json", "--check")
    assert code == 3
    shown = {s["name"]: s for s in data["aggregated_streams"]}
    assert shown[healthy]["stuck"] is None
    recorded = shown[poisoned]["stuck"]
    assert recorded["kind"] == "PoisonMessageError"
    assert (recorded["origin_stream"], recorded["version"]) == ("x-1", version)
    assert (recorded["global_position"], recorded["message_id"]) == (position, message_id)
    assert recorded["since"] is not None and recorded["age_seconds"] >= 0
    assert 'cannot be deserialized: TypeError("Unknown message type None' in recorded["error"]
    code, text = _status(dsn, store.name, capsys)
    assert code == 0  # without --check the exit status says the figures were read
    split = [re.split(r"\s{2,}", line) for line in text.splitlines()]
    table = {cells[0]: cells for cells in split if len(cells) == 8}
    assert table["AGGREGATED STREAM"][7] == "STATE"
    assert re.fullmatch(r"STUCK for [0-9.]+ s", table[poisoned][7])
    assert table[healthy][7] == "ok"
    [line] = [line for line in text.splitlines() if line.startswith(f"{poisoned} is STUCK since")]
    assert message_id in line
    assert f"stream 'x-1', version {version}, global position {position}" in line

    # Retried every poll interval, logged once; the process keeps running.
    time.sleep(1.0)
    assert len(p.named("stuck")) == 1
    assert p.proc.poll() is None

    # The operator records the message's time: the stream goes on by itself.
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"UPDATE depeche_msgs_{store.name} SET occurred_at = now() WHERE message_id = %s",
            (message_id,),
        )
    resumed = p.wait_for("resumed", stream=poisoned)
    assert resumed["message_id"] == message_id and resumed["seconds"] > 0
    _wait_count(engine, poisoned, 12 + 1 + 6)
    rows = check_invariants(engine, store.name, poisoned, "x-%")
    assert len(rows) == 19
    assert _series(scrape(port), "depeche_rs_stuck", stream=poisoned) == 0
    code, data = _status(dsn, store.name, capsys, "--json", "--check")
    assert code == 0
    assert all(s["stuck"] is None for s in data["aggregated_streams"])
    assert p.stop() == 0
    check_invariants(engine, store.name, healthy, "acc-%")


def test_every_stream_stuck_exits_1_and_the_record_stays_until_a_projector_goes_on(
    store: Store,
    stream_name: str,
    engine: sa.Engine,
    dsn: str,
    cli: Cli,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _write(store, streams=2, per_stream=3)
    message_id, version, position = _write_poison(engine, store.name, "acc-1")
    args = _project(
        dsn,
        store.name,
        stream_name,
        "--partitioner",
        "stream-hash",
        "--serializer",
        "tests.test_cli_app:serializer",
        "--poll-interval",
        "0.2",
    )
    p = cli(*args)
    assert p.wait() == 1
    assert p.wait_for("stuck")["global_position"] == position
    assert p.wait_for("error")["stuck"] == [stream_name]
    assert p.events[-1]["event"] == "stopped" and p.events[-1]["status"] == 1

    # The process is gone; `status` still says where the stream stopped.
    code, data = _status(dsn, store.name, capsys, "--json", "--check")
    [shown] = data["aggregated_streams"]
    assert code == 3 and shown["projector"] is None
    assert (shown["stuck"]["message_id"], shown["stuck"]["version"]) == (message_id, version)

    # --once with a stuck stream: the others are done, the exit status says it is not.
    once = cli(*args, "--once")
    assert once.wait() == 1
    assert once.wait_for("done")["stuck"] == [stream_name]

    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"DELETE FROM depeche_msgs_{store.name} WHERE message_id = %s", (message_id,)
        )
    again = cli(*args, "--once")
    assert again.wait() == 0
    # Stuck in an earlier process: cleared without a `resumed` line in this one.
    assert not again.named("resumed")
    code, data = _status(dsn, store.name, capsys, "--json", "--check")
    assert code == 0 and data["aggregated_streams"][0]["stuck"] is None
    assert len(check_invariants(engine, store.name, stream_name, "acc-%")) == 6


def test_a_failing_partitioner_and_an_unsafe_sequence_stick_only_their_streams(
    store: Store,
    stream_name: str,
    engine: sa.Engine,
    dsn: str,
    cli: Cli,
    tmp_path: Any,
    serializer: Any,
) -> None:
    other = MessageStore(f"{store.name}_b", engine, serializer)
    _write(store, streams=2, per_stream=3)
    store.write("acc-13", Deposited(account=13, amount=1))
    store.write("acc-13", Deposited(account=13, amount=2))
    _write(store, streams=2, per_stream=2, prefix="other")
    _write(other, streams=2, per_stream=2)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER SEQUENCE depeche_msgs_{other.name}_global_seq CACHE 20")
        blamed = conn.exec_driver_sql(
            f"SELECT message_id::text, version, global_position FROM depeche_msgs_{store.name} "
            "WHERE stream = 'acc-13' ORDER BY version LIMIT 1"
        ).one()
    picky, unsafe, healthy = (f"{stream_name}_{n}" for n in ("picky", "unsafe", "healthy"))
    config = tmp_path / "projectors.toml"
    config.write_text(
        f'dsn = "{dsn}"\n'
        f'[[streams]]\nstore = "{store.name}"\nstream = "{picky}"\nwildcards = ["acc-%"]\n'
        'partitioner = "tests.test_cli_app:PickyPartitioner"\n'
        f'[[streams]]\nstore = "{other.name}"\nstream = "{unsafe}"\nwildcards = ["acc-%"]\n'
        'partitioner = "stream-hash"\n'
        f'[[streams]]\nstore = "{store.name}"\nstream = "{healthy}"\n'
        'wildcards = ["other-%"]\npartitioner = "stream-hash"\n'
    )
    p = cli("project", "--config", str(config), "--log-format", "json", "--poll-interval", "0.2")

    # A partitioner error names only the message id: the rest is looked up.
    failed = p.wait_for("stuck", stream=picky)
    assert failed["kind"] == "PartitionerError"
    assert (failed["message_id"], failed["origin_stream"]) == (blamed[0], "acc-13")
    assert (failed["version"], failed["global_position"]) == (blamed[1], blamed[2])
    assert "fix the partitioner" in failed["message"]
    assert f"stream 'acc-13', version {blamed[1]}, global position {blamed[2]}" in failed["message"]
    sequence = p.wait_for("stuck", stream=unsafe)
    assert sequence["kind"] == "UnsafeSequenceError" and sequence["message_id"] is None
    assert f"ALTER SEQUENCE depeche_msgs_{other.name}_global_seq CACHE 1" in sequence["message"]
    assert p.wait_for("caught_up", stream=healthy)["projected"] == 4
    time.sleep(0.6)
    assert len(p.named("stuck")) == 2 and p.proc.poll() is None

    with engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER SEQUENCE depeche_msgs_{other.name}_global_seq CACHE 1")
    assert p.wait_for("resumed", stream=unsafe)["kind"] == "UnsafeSequenceError"
    _wait_count(engine, unsafe, 4)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"UPDATE depeche_msgs_{store.name} SET message = jsonb_set(message, '{{account}}', "
            "'14') WHERE stream = 'acc-13'"
        )
    assert p.wait_for("resumed", stream=picky)["message_id"] == blamed[0]
    _wait_count(engine, picky, 8)
    assert p.stop() == 0
    check_invariants(engine, store.name, picky, "acc-%")
    check_invariants(engine, other.name, unsafe, "acc-%")


def _in_transaction(dsn: str, agg: str) -> bool:
    """True while the projector of `agg` is inside a batch (its transaction open)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        states = conn.execute(
            "SELECT state FROM pg_stat_activity WHERE application_name = %s",
            (f"depeche-rs projector depeche_stream_{agg}",),
        ).fetchall()
    return states == [("idle in transaction",)]


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)
