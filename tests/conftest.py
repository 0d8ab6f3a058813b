"""Fixtures: a real PostgreSQL (DEPECHE_RS_TEST_DSN, else an embedded server), unique
names per test, and the tables of each test dropped afterwards."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

import depeche_rs
from depeche_rs.tools import PydanticMessageSerializer

from ._models import AnyEvent


@pytest.fixture(scope="session")
def dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The test database; never skipped for lack of one."""
    from_env = os.environ.get("DEPECHE_RS_TEST_DSN")
    if from_env:
        yield from_env
        return
    from depeche_rs._embedded import start_embedded

    data_dir = os.environ.get("DEPECHE_RS_DATA_DIR") or str(
        Path(__file__).resolve().parents[1] / ".depeche-rs" / "test-pgdata"
    )
    yield start_embedded(data_dir)


@pytest.fixture(scope="session")
def engine(dsn: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(depeche_rs._connection.sqlalchemy_url(dsn), pool_size=10)
    yield eng
    eng.dispose()


@pytest.fixture()
def suffix(dsn: str) -> Iterator[str]:
    """A unique name part; every database object containing it is dropped afterwards."""
    value = "t" + uuid.uuid4().hex[:12]
    yield value
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT relname, relkind FROM pg_class WHERE relkind IN ('r', 'S') AND relname LIKE %s",
            (f"%{value}%",),
        ).fetchall()
        functions = conn.execute(
            "SELECT oid::regprocedure::text FROM pg_proc WHERE proname LIKE %s",
            (f"%{value}%",),
        ).fetchall()
        for name, kind in tables:
            what = "TABLE" if kind == "r" else "SEQUENCE"
            conn.execute(f"DROP {what} IF EXISTS {name} CASCADE")
        for (signature,) in functions:
            conn.execute(f"DROP FUNCTION IF EXISTS {signature} CASCADE")


@pytest.fixture()
def store_name(suffix: str) -> str:
    return "s_" + suffix


@pytest.fixture()
def stream_name(suffix: str) -> str:
    return "a_" + suffix


@pytest.fixture()
def serializer() -> PydanticMessageSerializer[AnyEvent]:
    return PydanticMessageSerializer(AnyEvent)


@pytest.fixture()
def store(
    store_name: str, engine: sa.Engine, serializer: PydanticMessageSerializer[AnyEvent]
) -> depeche_rs.MessageStore[AnyEvent]:
    return depeche_rs.MessageStore(store_name, engine, serializer)
