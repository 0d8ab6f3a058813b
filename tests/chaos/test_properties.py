"""Property-based tests: names, wildcards, partition values and payloads. For any input,
either a clear error (one of ours, or a `ValueError`/`TypeError`) and nothing written,
or the correct result; never a crash, a raw database error or a partial write.

Each property runs on a database of its own, so "nothing written" is checked exactly: the
set of tables, sequences, indexes and functions is the same before and after.
Generation is seeded with `DEPECHE_RS_CHAOS_SEED` (no example database), so a failure
replays with the same seed.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, given, seed
from hypothesis import settings as hsettings
from hypothesis import strategies as st

import depeche_rs
from depeche_rs import MessageHandlerRegister, MessageStore, StoredMessage, SubscriptionMessage
from depeche_rs._names import (
    MAX_AGGREGATED_STREAM_NAME_LENGTH,
    MAX_STATE_NAME_LENGTH,
    MAX_STORE_NAME_LENGTH,
)
from depeche_rs.tools import PydanticMessageSerializer, StreamHashPartitioner

from .._models import AnyEvent, Deposited
from ._harness import Settings, private_database

pytestmark = pytest.mark.chaos

SETTINGS = Settings.from_env()
EXAMPLES = SETTINGS.scaled(25)


def _hypothesis(examples: int = EXAMPLES) -> Any:
    return hsettings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Errors that count as "clear": ours, and the built-in ones a caller checks arguments with.
CLEAR = (depeche_rs.DepecheError, ValueError, TypeError)
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# Characters that mean something to LIKE, to regular expressions, to SQL or to JSON.
TRICKY = "ab_%\\-.*+?[]^$(){}|'\";: \n\téß日İ🙂\x00"


class Db:
    """A private database, an engine on it, and exact snapshots of its objects."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = sa.create_engine(depeche_rs._connection.sqlalchemy_url(url))

    def objects(self) -> set[tuple[str, str]]:
        with psycopg.connect(self.url) as conn:
            rels = conn.execute(
                "SELECT relkind::text, relname::text FROM pg_class "
                "WHERE relnamespace = 'public'::regnamespace"
            ).fetchall()
            procs = conn.execute(
                "SELECT 'f', oid::regprocedure::text FROM pg_proc "
                "WHERE pronamespace = 'public'::regnamespace"
            ).fetchall()
        return {(k, n) for k, n in rels + procs}

    def drop(self, objects: set[tuple[str, str]]) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            for kind, name in sorted(objects):
                if kind == "r":
                    conn.execute(f'DROP TABLE IF EXISTS "{name}" CASCADE')
            for kind, name in sorted(objects):
                if kind == "S":
                    conn.execute(f'DROP SEQUENCE IF EXISTS "{name}" CASCADE')
                elif kind == "f":
                    conn.execute(f"DROP FUNCTION IF EXISTS {name} CASCADE")


@pytest.fixture(scope="module")
def db(dsn: str) -> Iterator[Db]:
    with private_database(dsn, f"chaos_{uuid.uuid4().hex[:12]}") as url:
        database = Db(url)
        try:
            yield database
        finally:
            database.engine.dispose()


def _store(db: Db, name: str) -> MessageStore[AnyEvent]:
    return MessageStore(name, db.engine, PydanticMessageSerializer(AnyEvent))


# -- names ----------------------------------------------------------------------------

# A subscription's default state provider is named after it, so its limit applies.
MAX_LENGTH = {
    "store": MAX_STORE_NAME_LENGTH,
    "aggregated stream": MAX_AGGREGATED_STREAM_NAME_LENGTH,
    "subscription": MAX_STATE_NAME_LENGTH,
}
VALID_NAMES = st.from_regex(
    rf"[A-Za-z_][A-Za-z0-9_]{{0,{MAX_STORE_NAME_LENGTH - 1}}}", fullmatch=True
)
NAMES = st.one_of(
    VALID_NAMES,
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{34,44}", fullmatch=True),  # around the limit
    st.text(st.sampled_from(TRICKY + "AZ09"), max_size=12),
    st.text(max_size=8),
    st.sampled_from(
        ["", "1abc", "a b", "a;drop", "x" * 39, "x" * 40, "x" * 41, "x" * 42, "é", "select", "_"]
    ),
    st.integers() | st.none(),
)


@_hypothesis()
@seed(SETTINGS.seed)
@given(
    name=st.one_of(VALID_NAMES, NAMES),
    kind=st.sampled_from(["store", "aggregated stream", "subscription"]),
)
def test_any_name_is_rejected_cleanly_or_works(db: Db, name: Any, kind: str) -> None:
    valid = isinstance(name, str) and bool(IDENTIFIER.match(name)) and len(name) <= MAX_LENGTH[kind]
    base = _store(db, "base7q3x")
    base_stream = base.aggregated_stream("base7q3x_agg", StreamHashPartitioner(2), ["n-%"])
    if not list(base.read("n-1")):
        base.write("n-1", Deposited(account=1, amount=1))
        base_stream.projector.update_full()
    before = db.objects()
    try:
        if kind == "store":
            store = _store(db, name)
            position = store.write("n-1", Deposited(account=1, amount=2))
            assert [m.version for m in store.read("n-1")] == [position.version]
        elif kind == "aggregated stream":
            stream = base.aggregated_stream(name, StreamHashPartitioner(2), ["n-%"])
            assert stream.projector.update_full() == (1, False)
            stream.projector.close()
        else:
            seen: list[int] = []
            handlers: MessageHandlerRegister[AnyEvent] = MessageHandlerRegister()

            @handlers.register
            def handle(message: SubscriptionMessage[Deposited]) -> None:
                seen.append(message.position)

            subscription = base_stream.subscription(name, handlers=handlers)
            try:
                subscription.runner.run_once()
            finally:
                subscription.close()
            assert seen == [0]
        created = db.objects() - before
    except CLEAR as exc:
        event(f"{kind} name refused")
        assert not valid, f"{kind} name {name!r} is valid but was refused: {exc!r}"
        assert isinstance(exc, depeche_rs.InvalidNameError)
        assert db.objects() == before, "a refused name left objects behind"
        return
    finally:
        db.drop(db.objects() - before)
    event(f"{kind} name accepted")
    assert valid, f"{kind} name {name!r} was accepted"
    # No object name we chose was cut at PostgreSQL's 63 bytes (two names would then
    # share it). The indexes of unnamed constraints (`..._key`, `..._pkey`) are named by
    # PostgreSQL, as for depeche-db's tables: it shortens them and keeps them unique.
    truncated = [
        n
        for _, n in created
        if name.lower() not in n.split("(")[0] and not n.endswith(("_key", "_pkey"))
    ]
    assert not truncated, f"derived names lost part of {name!r}: {truncated}"


# -- stream names and wildcards ---------------------------------------------------------

# Streams written once; every wildcard is checked against all of them.
CORPUS = [
    "a",
    "ab",
    "a_b",
    "a%b",
    "aXb",
    "a\\b",
    "a\\\\b",
    "a\\",
    "a\\\\",
    "A",
    "é",
    "éb",
    "日本",
    "İ",
    "i",
    "a.b",
    "a*b",
    "a[b]",
    "^a$",
    "a\nb",
    "a b",
    "🙂-1",
    "%",
    "_",
    "\\",
    "x" * 255,
    "é" * 255,
    "a'b",
    'a"b',
    "a;--",
]

# Wildcards are built from pieces that mean something to LIKE or to a regex, and from
# parts of the stream names, so that they do match some streams.
PIECES = [*"ab_%\\éX.*[]^$İ\n '🙂", "\\" * 2, "\\" * 3, "\\_", "\\%", "日本", "x" * 250]
WILDCARD = st.lists(
    st.sampled_from(PIECES) | st.sampled_from(CORPUS).map(lambda c: c[: len(c) // 2]),
    max_size=4,
).map("".join)
WILDCARDS = st.one_of(
    st.lists(WILDCARD, min_size=1, max_size=3),
    st.lists(WILDCARD.map(lambda w: w + "%"), min_size=1, max_size=3),
    st.lists(WILDCARD, max_size=1),
)


def _trailing_backslashes(wildcard: str) -> int:
    return len(wildcard) - len(wildcard.rstrip("\\"))


@pytest.fixture(scope="module")
def corpus_store(db: Db) -> MessageStore[AnyEvent]:
    store = _store(db, "corpus")
    for stream in CORPUS:
        store.write(stream, Deposited(account=1, amount=len(stream)))
    return store


def _like(db: Db, wildcards: list[str]) -> set[str]:
    with psycopg.connect(db.url) as conn:
        rows = conn.execute(
            "SELECT s FROM unnest(%s::text[]) AS s WHERE s LIKE ANY(%s::text[])",
            (CORPUS, wildcards),
        ).fetchall()
    return {r[0] for r in rows}


@_hypothesis(SETTINGS.scaled(40))
@seed(SETTINGS.seed)
@given(wildcards=WILDCARDS)
def test_any_wildcard_is_rejected_cleanly_or_selects_what_like_selects(
    db: Db, corpus_store: MessageStore[AnyEvent], wildcards: list[str]
) -> None:
    before = db.objects()
    name = f"w{uuid.uuid4().hex[:10]}"
    try:
        stream = corpus_store.aggregated_stream(name, StreamHashPartitioner(3), wildcards)
    except CLEAR as exc:
        event("wildcards refused")
        assert isinstance(exc, depeche_rs.InvalidWildcardError), repr(exc)
        assert not wildcards or any(
            w == "" or "\x00" in w or _trailing_backslashes(w) % 2 == 1 for w in wildcards
        ), f"{wildcards!r} refused: {exc}"
        assert db.objects() == before
        return
    try:
        expected = _like(db, wildcards)
        event(f"wildcards match {('none', 'one')[len(expected)] if len(expected) < 2 else 'more'}")
        n, more = stream.projector.update_full()
        with psycopg.connect(db.url) as conn:
            projected = {
                r[0] for r in conn.execute(f"SELECT origin_stream FROM depeche_stream_{name}")
            }
        assert projected == expected
        assert (n, more) == (len(expected), False)
        for candidate in CORPUS:
            # The notification filter (a regex translation of the wildcards) agrees.
            assert stream.projector.interested_in_notification({"stream": candidate}) == (
                candidate in expected
            ), (candidate, wildcards)
        stream.projector.close()
    finally:
        db.drop(db.objects() - before)


# -- partition values -------------------------------------------------------------------

ANY_VALUE = st.one_of(
    st.integers(-(2**40), 2**40),
    st.sampled_from([-1, 2**31 - 1, 2**31, 2**63, True, False, None, 1.0, "1", b"1"]),
)


@st.composite
def partition_values(draw: st.DrawFn) -> list[Any]:
    """Eight partitions, mostly valid, with up to two arbitrary values put in."""
    values = draw(st.lists(st.integers(0, 7) | st.integers(0, 2**31 - 1), min_size=8, max_size=8))
    for _ in range(draw(st.integers(0, 2))):
        values[draw(st.integers(0, 7))] = draw(ANY_VALUE)
    return values


class ScriptedPartitioner:
    """Returns, for each message, the value the example chose for it."""

    def __init__(self, values: dict[uuid.UUID, Any]) -> None:
        self.values = values

    def get_partition(self, message: StoredMessage[Any]) -> Any:
        return self.values[message.message_id]


def _valid_partition(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31


@pytest.fixture(scope="module")
def partition_store(db: Db) -> tuple[MessageStore[AnyEvent], list[uuid.UUID]]:
    store = _store(db, "parts")
    for i in range(8):
        store.write(f"p-{i % 3}", Deposited(account=i, amount=i))
    with psycopg.connect(db.url) as conn:
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT message_id FROM depeche_msgs_parts ORDER BY global_position"
            )
        ]
    return store, ids


@_hypothesis()
@seed(SETTINGS.seed)
@given(values=partition_values(), batch=st.integers(1, 5))
def test_any_partition_value_is_refused_with_whole_batches_or_used(
    db: Db,
    partition_store: tuple[MessageStore[AnyEvent], list[uuid.UUID]],
    values: list[Any],
    batch: int,
) -> None:
    store, ids = partition_store
    name = f"p{uuid.uuid4().hex[:10]}"
    before = db.objects()
    by_id = dict(zip(ids, values, strict=True))
    bad = [i for i, v in enumerate(values) if not _valid_partition(v)]
    try:
        stream = store.aggregated_stream(
            name, ScriptedPartitioner(by_id), ["p-%"], update_batch_size=batch
        )
        try:
            result = stream.projector.update_full()
        except CLEAR as exc:
            event(f"partitioner refused in batch {bad[0] // batch if bad else None}")
            assert bad, f"valid partitions {values!r} refused: {exc!r}"
            assert isinstance(exc, depeche_rs.PartitionerError)
            assert exc.message_id == ids[bad[0]]
        else:
            event("partitions used")
            assert not bad, f"{values!r} accepted"
            assert result == (8, False)
        finally:
            stream.projector.close()
        with psycopg.connect(db.url) as conn:
            rows = conn.execute(
                f"SELECT message_id, partition, position FROM depeche_stream_{name} "
                "ORDER BY origin_stream_global_position"
            ).fetchall()
        # Whole batches before the first bad value, nothing of its batch.
        done = (bad[0] // batch) * batch if bad else 8
        assert [r[0] for r in rows] == ids[:done]
        assert all(r[1] == by_id[r[0]] for r in rows)
        positions: dict[int, list[int]] = {}
        for _, partition, position in rows:
            positions.setdefault(partition, []).append(position)
        assert all(p == list(range(len(p))) for p in positions.values())
    finally:
        db.drop(db.objects() - before)


# -- payloads -----------------------------------------------------------------------------


class Payload:
    """A message that is an arbitrary JSON-ish dict."""

    def __init__(self, body: Any, message_id: uuid.UUID | None = None) -> None:
        self.body = body
        self.message_id = message_id or uuid.uuid4()

    def get_message_id(self) -> uuid.UUID:
        return self.message_id

    def get_message_time(self) -> dt.datetime:
        return dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


class PayloadSerializer:
    def serialize(self, message: Payload) -> Any:
        return message.body

    def deserialize(self, message: Any) -> Payload:
        return Payload(message)


SURROGATE = re.compile("[\ud800-\udfff]")


def _unstorable_text(value: Any) -> bool:
    """A string jsonb cannot hold: a NUL, or a surrogate code point (not UTF-8)."""
    if isinstance(value, str):
        return "\x00" in value or bool(SURROGATE.search(value))
    if isinstance(value, dict):
        return any(_unstorable_text(k) or _unstorable_text(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_unstorable_text(v) for v in value)
    return False


def _storable(body: Any) -> bool:
    """A JSON object jsonb can hold: no NaN or infinity, no NUL, no surrogate."""
    if not isinstance(body, dict):
        return False
    try:
        json.dumps(body, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return not _unstorable_text(body)


def _same(stored: Any, given_: Any) -> bool:
    """JSON equality as jsonb keeps it (numbers compare by value: 1e308 comes back as
    an integer, 1.0 as 1)."""
    if isinstance(given_, bool) or isinstance(stored, bool):
        return stored is given_
    if isinstance(given_, int) and isinstance(stored, int):
        return stored == given_
    if isinstance(given_, int | float) and isinstance(stored, int | float):
        return float(stored) == float(given_)
    if isinstance(given_, dict):
        return (
            isinstance(stored, dict)
            and stored.keys() == given_.keys()
            and all(_same(stored[k], given_[k]) for k in given_)
        )
    if isinstance(given_, list | tuple):
        return (
            isinstance(stored, list)
            and len(stored) == len(given_)
            and all(_same(s, g) for s, g in zip(stored, given_, strict=True))
        )
    return bool(stored == given_)


TEXT = st.one_of(
    st.text(max_size=10), st.text(st.sampled_from(TRICKY.replace("\x00", "")), max_size=10)
)
# Escapes that look like NUL or surrogates to a careless check, and real surrogates.
ODD_PIECES = ["\\u0000", "\\\\u0000", "\\\u0000", "\ud800", "\udfff", "\ud83d\ude42", "\x00"]
ODD_TEXT = st.lists(st.sampled_from(ODD_PIECES) | TEXT, min_size=1, max_size=3).map("".join)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
JSONISH = st.recursive(
    st.one_of(SCALARS, SCALARS, SCALARS, st.floats()),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
OBJECTS = st.dictionaries(TEXT, JSONISH, max_size=5)
ODD_BODIES = st.one_of(
    JSONISH,  # not always a dict: must be refused unless it is one
    st.dictionaries(st.text(st.sampled_from(TRICKY), max_size=4), JSONISH, max_size=3),
    st.dictionaries(TEXT, st.text(st.sampled_from(TRICKY), max_size=6), max_size=3),
    st.dictionaries(ODD_TEXT, JSONISH, min_size=1, max_size=2),
    st.dictionaries(TEXT, ODD_TEXT, min_size=1, max_size=3),
    st.sampled_from([{"a": {1, 2}}, {"a": object()}, {"a": b"x"}, {"a": [float("nan")]}]),
)


@st.composite
def payloads(draw: st.DrawFn) -> list[Any]:
    """One to three JSON objects, half of the time with an odd body put among them."""
    bodies = draw(st.lists(OBJECTS, min_size=1, max_size=3))
    if draw(st.booleans()):
        bodies.insert(draw(st.integers(0, len(bodies))), draw(ODD_BODIES))
    return bodies


@_hypothesis(SETTINGS.scaled(60))
@seed(SETTINGS.seed)
@given(bodies=payloads())
def test_any_payload_round_trips_or_the_whole_write_is_refused(db: Db, bodies: list[Any]) -> None:
    store: MessageStore[Payload] = MessageStore("payloads", db.engine, PayloadSerializer())
    stream = f"pl-{uuid.uuid4().hex[:10]}"
    messages = [Payload(body) for body in bodies]
    storable = all(_storable(body) for body in bodies)
    with db.engine.connect() as conn:
        try:
            store.write_many(stream, messages, conn=conn)
        except CLEAR as exc:
            event("payload refused")
            assert not storable, f"{bodies!r} refused: {exc!r}"
            assert isinstance(exc, depeche_rs.SerializationError), repr(exc)
            # The caller's transaction is still usable: nothing was sent.
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
            conn.commit()
            assert list(store.read(stream)) == []
            return
        conn.commit()
    event("payload stored")
    assert storable, f"{bodies!r} accepted"
    stored = list(store.read(stream))
    assert [m.message_id for m in stored] == [m.message_id for m in messages]
    assert [m.version for m in stored] == list(range(1, len(bodies) + 1))
    for got, body in zip(stored, bodies, strict=True):
        assert _same(got.message.body, body), (got.message.body, body)
