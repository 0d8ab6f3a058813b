"""`depeche-rs status`: each aggregated stream's backlog and each subscription's lag, from
one REPEATABLE READ snapshot, so that the figures agree with each other. Where each figure
comes from, and how a subscription's aggregated stream is inferred: docs/cli.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import sys
import uuid as _uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg.errors

from .._db.connection import redact
from . import _catalog, _server_settings, _stuck
from ._config import ConfigError, read_toml, resolve_dsn, stream_specs

T = TypeVar("T")

# `status --check`: the figures were read, and an aggregated stream is stuck.
EXIT_STUCK = 3


@dataclasses.dataclass(frozen=True)
class PartitionLag:
    """One partition of a subscription."""

    partition: int
    position: int | None
    max_position: int
    lag: int


@dataclasses.dataclass(frozen=True)
class StreamStatus:
    """One aggregated stream."""

    name: str
    store: str | None
    wildcards: tuple[str, ...] | None
    definition: str | None
    partitions: int
    messages: int
    backlog: int | None
    oldest_unprojected_written_at: _dt.datetime | None
    oldest_unprojected_age_seconds: float | None
    projector: _catalog.LockHolder | None
    registered: bool = False
    stuck: _catalog.Stuck | None = None


@dataclasses.dataclass(frozen=True)
class SubscriptionStatus:
    """One subscription."""

    name: str
    state_table: str
    stream: str | None
    stream_inferred: bool
    total_lag: int | None
    partitions: tuple[PartitionLag, ...]
    note: str | None


def _parse_subscription_streams(values: Sequence[str]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for value in values:
        name, sep, stream = value.partition("=")
        if not sep or not name or not stream:
            raise ConfigError(f"--subscription takes NAME=STREAM, got {value!r}")
        mapping[name] = stream
    return mapping


def _vanishing(conn: psycopg.Connection[Any], query: Callable[..., T], *args: Any) -> T | None:
    """`query(conn, *args)` in a savepoint; None when its table was dropped meanwhile
    (another application's teardown must not fail the whole report)."""
    try:
        with conn.transaction():
            return query(conn, *args)
    except psycopg.errors.UndefinedTable:
        return None


def collect(
    conn: psycopg.Connection[Any],
    store: str | None,
    definitions: Mapping[str, tuple[str, tuple[str, ...]]],
    subscription_streams: Mapping[str, str],
    top: int,
) -> tuple[list[StreamStatus], list[SubscriptionStatus]]:
    """The figures, from one snapshot (the caller's transaction)."""
    store_names = _catalog.stores(conn)
    if store is not None and store not in store_names:
        raise LookupError(f"there is no message store {store!r} in this database")
    registry = {r.stream: r for r in _catalog.registrations(conn)}
    maxpos: dict[str, dict[int, int]] = {}
    for name in _catalog.aggregated_streams(conn):
        found = _vanishing(conn, _catalog.max_positions, name)
        if found is not None:
            maxpos[name] = found

    streams: list[StreamStatus] = []
    for name, positions in maxpos.items():
        source: str | None = None
        wildcards: tuple[str, ...] | None = None
        owner: str | None = None
        if name in definitions:
            source, (owner, wildcards) = "config", definitions[name]
        elif name in registry:
            source, owner, wildcards = "registry", registry[name].store, registry[name].wildcards
        else:
            candidates = [store] if store else store_names
            owner = _vanishing(conn, _catalog.store_of, name, candidates)
        if store is not None and owner != store:
            continue
        measured = None
        if wildcards and owner in store_names:
            measured = _vanishing(conn, _catalog.backlog, owner, name, wildcards)
        streams.append(
            StreamStatus(
                name=name,
                store=owner,
                wildcards=wildcards,
                definition=source,
                partitions=len(positions),
                messages=sum(m + 1 for m in positions.values()),
                backlog=measured.messages if measured else None,
                oldest_unprojected_written_at=measured.oldest_written_at if measured else None,
                oldest_unprojected_age_seconds=measured.oldest_age_seconds if measured else None,
                projector=_catalog.lock_holder(conn, name),
                registered=name in registry,
                stuck=registry[name].stuck if name in registry else None,
            )
        )

    shown = {s.name for s in streams}
    subscriptions: list[SubscriptionStatus] = []
    for table in _catalog.subscription_tables(conn):
        states = _vanishing(conn, _catalog.subscription_states, table)
        for sub, positions in sorted((states or {}).items()):
            stream = subscription_streams.get(sub)
            inferred = False
            note = None
            if stream is not None and stream not in maxpos:
                note = f"aggregated stream {stream!r} (from --subscription) does not exist"
                stream = None
            elif stream is None:
                candidates = [
                    n
                    for n, m in maxpos.items()
                    if all(p in m and pos <= m[p] for p, pos in positions.items())
                ]
                if len(candidates) == 1:
                    stream, inferred = candidates[0], True
                elif candidates:
                    note = (
                        f"its aggregated stream could be any of {', '.join(candidates)}; "
                        f"pass --subscription {sub}=STREAM"
                    )
                else:
                    note = "no aggregated stream has the partitions of its state"
            if stream is None:
                if store is not None:
                    continue  # cannot tell whether it belongs to the store
                subscriptions.append(SubscriptionStatus(sub, table, None, False, None, (), note))
                continue
            if store is not None and stream not in shown:
                continue
            lags = [
                PartitionLag(p, positions.get(p), m, lag=max(0, m - positions.get(p, -1)))
                for p, m in maxpos[stream].items()
            ]
            ordered = sorted(
                (lag for lag in lags if lag.lag > 0), key=lambda x: (-x.lag, x.partition)
            )
            subscriptions.append(
                SubscriptionStatus(
                    name=sub,
                    state_table=table,
                    stream=stream,
                    stream_inferred=inferred,
                    total_lag=sum(lag.lag for lag in lags),
                    partitions=tuple(ordered[:top] if top > 0 else ordered),
                    note=note,
                )
            )
    return streams, subscriptions


def _json_default(value: Any) -> Any:
    """A datetime, UUID or (figures') dataclass as JSON; json.dumps recurses into the result."""
    if isinstance(value, _dt.datetime):
        return value.isoformat()
    if isinstance(value, _uuid.UUID):
        return str(value)
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}


def render_json(
    streams: list[StreamStatus],
    subscriptions: list[SubscriptionStatus],
    settings: Sequence[_server_settings.SettingAdvice] = (),
) -> str:
    """The figures as one JSON document."""
    document = {"aggregated_streams": streams, "subscriptions": subscriptions}
    document["server_settings"] = list(settings)
    return json.dumps(document, indent=2, default=_json_default)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _table(header: Sequence[str], rows: list[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=False)]
    lines = []
    for row in [header, *rows]:
        cells = [
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=False))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _state(stream: StreamStatus) -> str:
    if stream.stuck is not None:
        return "STUCK for " + _age(stream.stuck.age_seconds).removesuffix(" ago")
    # Only `depeche-rs project` records a stuck stream: of others, nothing is known.
    return "ok" if stream.registered else "-"


def _stuck_lines(streams: list[StreamStatus]) -> list[str]:
    lines = []
    for s in streams:
        if s.stuck is None:
            continue
        since = s.stuck.since.strftime("%Y-%m-%d %H:%M:%S %Z").strip() if s.stuck.since else "?"
        at = _stuck.where(s.stuck, s.store)
        lines.append(
            f"{s.name} is STUCK since {since}" + (f" at {at}" if at else "") + f": {s.stuck.error}"
        )
    return lines


def render_text(
    streams: list[StreamStatus],
    subscriptions: list[SubscriptionStatus],
    settings: Sequence[_server_settings.SettingAdvice] = (),
) -> str:
    """The figures as two tables for people (a line per stuck stream, and one per server
    setting that holds projection back)."""
    lines: list[str] = []
    if streams:
        rows: list[Sequence[str]] = [
            (
                s.name,
                s.store or "?",
                f"{s.partitions:,}",
                f"{s.messages:,}",
                f"{s.backlog:,}" if s.backlog is not None else "unknown",
                _age(s.oldest_unprojected_age_seconds),
                s.projector.describe() if s.projector else "none active",
                _state(s),
            )
            for s in streams
        ]
        header: tuple[str, ...] = ("AGGREGATED STREAM", "STORE", "PARTITIONS", "MESSAGES")
        header += ("BACKLOG", "OLDEST UNPROJECTED", "PROJECTOR", "STATE")
        lines += _table(header, rows, right={2, 3, 4})
        if any(s.backlog is None for s in streams):
            lines.append(
                "(backlog unknown: no wildcards recorded for the stream; run `depeche-rs "
                "project` for it once, or pass --config)"
            )
        lines += _stuck_lines(streams)
    else:
        lines.append("no aggregated streams")
    lines.append("")
    if subscriptions:
        rows = []
        for sub in subscriptions:
            top = ", ".join(f"{p.partition}: {p.lag:,}" for p in sub.partitions) or "-"
            stream = (sub.stream or "?") + (" (inferred)" if sub.stream_inferred else "")
            total = f"{sub.total_lag:,}" if sub.total_lag is not None else "unknown"
            rows.append((sub.name, stream, total, top if sub.note is None else sub.note))
        header = ("SUBSCRIPTION", "AGGREGATED STREAM", "TOTAL LAG", "LAG BY PARTITION (TOP)")
        lines += _table(header, rows, right={2})
    else:
        lines.append("no subscriptions")
    if settings:
        lines.append("")
        lines += [f"warning: {a.describe()}" for a in settings]
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    """Run `depeche-rs status`; returns the exit status."""
    config: dict[str, Any] = read_toml(args.config) if args.config else {}
    dsn = resolve_dsn(args.dsn, config)
    if args.top < 0:
        raise ConfigError(f"--top must be 0 (all) or more, got {args.top}")
    specs = stream_specs(args, config, projecting=False)
    definitions = {s.stream: (s.store, s.wildcards) for s in specs}
    subscription_streams = _parse_subscription_streams(args.subscription or [])
    try:
        with psycopg.connect(dsn, application_name="depeche-rs status") as conn:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            streams, subscriptions = collect(
                conn, args.store, definitions, subscription_streams, args.top
            )
            settings = _server_settings.advice(conn, [s.name for s in streams])
            conn.rollback()
    except psycopg.OperationalError as exc:
        print(f"depeche-rs status: cannot connect to {redact(dsn)}: {exc}", file=sys.stderr)
        return 1
    except (psycopg.Error, LookupError) as exc:
        print(f"depeche-rs status: {exc}", file=sys.stderr)
        return 1
    render = render_json if args.json else render_text
    print(render(streams, subscriptions, settings))
    if args.check and any(s.stuck is not None for s in streams):
        return EXIT_STUCK
    return 0
