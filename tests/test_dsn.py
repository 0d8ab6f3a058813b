"""DSNs in both of libpq's forms (URL and key/value), parsed and built by psycopg's
`conninfo`, reach every connection we open intact: SQLAlchemy's, psycopg's (LISTEN, locks)
and the Rust engine's (tokio-postgres), passwords with special characters included."""

from __future__ import annotations

import re
import urllib.parse

import psycopg
import pytest
import sqlalchemy as sa
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import depeche_rs
from depeche_rs._connection import libpq_dsn, libpq_form, redact, sqlalchemy_url, to_engine
from depeche_rs._exceptions import DatabaseConnectionError
from depeche_rs.tools import PydanticMessageSerializer, StreamNamePartitioner

from ._models import AnyEvent, Deposited

# The test server trusts local connections, so a password is carried, not checked: each
# connection reports the one libpq was given (`info.password`), which is what must survive.
PASSWORDS = ["plain", "p@ss:w/rd?#[]", "sp ace'quote\\back\"", "pct%41+plus&x=y;"]


def _url_form(dsn: str, password: str) -> str:
    p = conninfo_to_dict(dsn)
    auth = urllib.parse.quote(str(p["user"]), safe="") + ":" + urllib.parse.quote(password, safe="")
    query = "?options=" + urllib.parse.quote("-c statement_timeout=4321ms", safe="")
    return f"postgresql://{auth}@{p['host']}:{p.get('port', 5432)}/{p['dbname']}{query}"


def _keyvalue_form(dsn: str, password: str) -> str:
    return make_conninfo(dsn, password=password, options="-c statement_timeout=4321ms")


FORMS = {"url": _url_form, "key/value": _keyvalue_form}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("password", PASSWORDS)
def test_both_forms_reach_sqlalchemy_and_psycopg_intact(dsn: str, form: str, password: str) -> None:
    given = FORMS[form](dsn, password)
    engine = to_engine(given)
    try:
        assert engine.url.password == password
        with engine.connect() as conn:
            info = conn.connection.driver_connection.info  # type: ignore[union-attr]
            assert info.password == password
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar_one() == "4321ms"
        # What the Rust engine, LISTEN and the lock provider connect with.
        conninfo = libpq_dsn(engine)
        assert conninfo_to_dict(conninfo)["password"] == password
        with psycopg.connect(conninfo) as conn:
            assert conn.info.password == password
            assert conn.execute("SHOW statement_timeout").fetchone() == ("4321ms",)
    finally:
        engine.dispose()
    assert conninfo_to_dict(libpq_form(sqlalchemy_url(given))) == conninfo_to_dict(given)
    assert password not in redact(given)


@pytest.mark.parametrize("form", FORMS)
def test_the_rust_engine_projects_through_either_form(
    dsn: str, form: str, store_name: str, stream_name: str
) -> None:
    given = FORMS[form](dsn, PASSWORDS[2])
    store = depeche_rs.MessageStore(store_name, given, PydanticMessageSerializer(AnyEvent))
    try:
        assert conninfo_to_dict(store.dsn)["password"] == PASSWORDS[2]
        for amount in range(3):
            store.write("acc-1", Deposited(account=1, amount=amount))
        agg = store.aggregated_stream(stream_name, StreamNamePartitioner(), ["acc-%"])
        assert agg.projector.update_full() == (3, False)
    finally:
        store.engine.dispose()


def test_socket_directories_and_host_lists_pass_to_libpq_as_they_are() -> None:
    for given, host, port in [
        ("host=/var/run/postgresql dbname=db", "/var/run/postgresql", None),
        ("postgresql:///db?host=/tmp&port=5433", "/tmp", "5433"),
        ("host=h1,h2 port=5432,5433 dbname=db user=u", "h1,h2", "5432,5433"),
        ("postgresql://u@h1:5432,h2:5433/db", "h1,h2", "5432,5433"),
    ]:
        url = sa.make_url(sqlalchemy_url(given))
        _, args = sa.create_engine(url).dialect.create_connect_args(url)
        assert (args["host"], args.get("port"), args["dbname"]) == (host, port, "db"), given
        assert conninfo_to_dict(libpq_form(str(url.render_as_string(False)))) == conninfo_to_dict(
            given
        )


def test_sqlalchemy_urls_pass_as_they_are_and_become_libpq_conninfo() -> None:
    url = "postgresql+psycopg://u:p%40ss@h:5433/db?application_name=x"
    assert sqlalchemy_url(url) == url
    assert conninfo_to_dict(libpq_form(url)) == {
        "user": "u",
        "password": "p@ss",
        "host": "h",
        "port": "5433",
        "dbname": "db",
        "application_name": "x",
    }


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("mysql://u:secret@h/db", "unsupported DSN (mysql)"),
        ("just-a-name", "unsupported DSN (not a URL)"),
        ("host=h password=secret bogus_option=1", 'invalid connection option "bogus_option"'),
    ],
)
def test_a_dsn_libpq_cannot_read_is_a_value_error_without_the_password(
    given: str, says: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(says)) as raised:
        to_engine(given)
    assert "secret" not in str(raised.value)


def test_a_dsn_that_does_not_connect_is_a_connection_error(store_name: str) -> None:
    unreachable = make_conninfo(host="127.0.0.1", port=1, user="u", password="secret", dbname="x")
    with pytest.raises(DatabaseConnectionError) as raised:
        depeche_rs.MessageStore(store_name, unreachable, PydanticMessageSerializer(AnyEvent))
    assert "secret" not in str(raised.value)
