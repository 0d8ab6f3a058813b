"""Run depeche-db 0.13.1's own test suite against depeche_rs, through an import alias.

    DEPECHE_RS_TEST_DSN=postgresql://postgres@127.0.0.1:5432/test \
        python scripts/depeche_db_suite.py [--sdist PATH] [pytest args...]

Downloads the depeche-db==0.13.1 sdist with pip into a temporary directory (its code is
never copied into this repository), extracts its `tests/`, and runs pytest on them with a
plugin that (1) makes `depeche_db` and every `depeche_db.<sub>` module name refer to
`depeche_rs` and its submodule of the same name, and (2) replaces the suite's `pg_db`
fixture, which points at a hard-coded server (localhost:4888), with a database created on
the server of DEPECHE_RS_TEST_DSN. Nothing else in the suite is changed, except that
`depeche_db._compat` (depeche-db's private driver probe, which a few test modules read at
import time) is answered with a two-line stand-in saying psycopg 3 is the driver, and
tests marked `asyncio` are run with `asyncio.run` (instead of needing pytest-asyncio).
Prints pytest's pass/fail summary and exits with its status.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.13.1"

PLUGIN = '''
"""Written by depeche-rs scripts/depeche_db_suite.py: alias depeche_db to depeche_rs."""
import asyncio
import importlib
import inspect
import os
import pkgutil
import sys
import types
import uuid

import psycopg
import pytest
from psycopg import sql

import depeche_rs

sys.modules["depeche_db"] = depeche_rs
for _info in pkgutil.walk_packages(depeche_rs.__path__, "depeche_rs."):
    _module = importlib.import_module(_info.name)
    sys.modules["depeche_db" + _info.name[len("depeche_rs"):]] = _module

# depeche-db's private driver probe; depeche_rs runs on psycopg 3 only.
_compat = types.ModuleType("depeche_db._compat")
_compat.PSYCOPG_VERSION = "3"
_compat.PSYCOPG3_AVAILABLE = True
sys.modules["depeche_db._compat"] = _compat
depeche_rs._compat = _compat


def _server_dsn():
    dsn = os.environ.get("DEPECHE_RS_TEST_DSN")
    if not dsn:
        raise pytest.UsageError("set DEPECHE_RS_TEST_DSN to a PostgreSQL server's DSN")
    return dsn


def _pg_db():
    """A fresh database on DEPECHE_RS_TEST_DSN's server, dropped at the end."""
    server = _server_dsn()
    name = f"depeche_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(server)
    info["dbname"] = name
    url = _as_url(info)
    yield url
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _as_url(info):
    from urllib.parse import quote

    user = quote(info.get("user", "postgres"), safe="")
    password = info.get("password")
    auth = user + (":" + quote(password, safe="") if password else "")
    host = info.get("host", "localhost")
    port = info.get("port", "5432")
    return f"postgresql+psycopg://{auth}@{host}:{port}/{info['dbname']}"


def pytest_configure(config):
    config.addinivalue_line("markers", "asyncio: run the coroutine test in an event loop")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    # The suite's async tests are marked for pytest-asyncio; running them here saves
    # that dependency (none of them uses async fixtures).
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}
    asyncio.run(pyfuncitem.obj(**kwargs))
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef, request):
    # The suite's conftest defines pg_db on a hard-coded server; swap in ours.
    if fixturedef.argname == "pg_db" and fixturedef.func is not _pg_db:
        fixturedef.func = _pg_db
'''


def _sdist(dest: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"),
            *("--no-binary", ":all:", f"depeche-db=={VERSION}", "-d", str(dest)),
        ],
        check=True,
    )
    return next(dest.glob(f"depeche_db-{VERSION}.tar.gz"))


def _extract_tests(sdist: Path, dest: Path) -> Path:
    prefix = f"depeche_db-{VERSION}/tests/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        tar.extractall(dest, members=members, filter="data")
    return dest / f"depeche_db-{VERSION}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", help="a local depeche_db-0.13.1.tar.gz instead of pip's")
    args, pytest_args = parser.parse_known_args()
    if not os.environ.get("DEPECHE_RS_TEST_DSN"):
        print("set DEPECHE_RS_TEST_DSN to a PostgreSQL server's DSN", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="depeche-db-suite-") as tmp:
        root = _extract_tests(_sdist(Path(tmp), args.sdist), Path(tmp))
        (root / "_depeche_rs_alias.py").write_text(PLUGIN)
        env = {**os.environ, "PYTHONPATH": str(root)}
        command = [
            *(sys.executable, "-m", "pytest", "tests", "-p", "_depeche_rs_alias"),
            *("-q", "-rfE", "--no-header", "-o", "addopts=", "-p", "no:cacheprovider"),
            "--continue-on-collection-errors",
            *pytest_args,
        ]
        return subprocess.run(command, cwd=root, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
