"""`depeche-rs migrate`: print, or apply, the DDL bringing depeche-db's layouts to ours.

The script is the one `AggregatedStream.get_migration_ddl` and friends return: idempotent
(running it on objects already at our layout changes nothing) and additive. It runs in one
transaction, under the same advisory lock as the library's own table creation, so it is
safe while applications start up. `--reset-cursors` adds a `DELETE` of the streams'
projector cursors (docs/projector.md, assumption A2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import psycopg

from .. import _names
from .._db import migrations, schema
from .._db.connection import redact
from .._exceptions import InvalidNameError
from .._projection.aggregated_stream import AggregatedStream
from ._config import ConfigError, resolve_dsn

# The lock the library takes while creating the same objects.
_LOCK = schema.lock_sql() + ";"


def _validate_names(store: str, streams: Sequence[str], subscriptions: Sequence[str] = ()) -> None:
    try:
        _names.validate_name(store, "store name")
        for stream in streams:
            _names.validate_name(stream, "aggregated stream name")
        for name in subscriptions:
            _names.validate_name(name, "subscription state name")
    except InvalidNameError as exc:
        raise ConfigError(str(exc)) from exc


def migration_script(
    store: str,
    streams: list[str],
    subscriptions: list[str],
    reset_cursors: bool = False,
    depeche_db_0_14: bool = False,
) -> str:
    """The whole script, without BEGIN/COMMIT."""
    _validate_names(store, streams, subscriptions)
    parts = [_LOCK, f"-- store {store}", migrations.store_migration_ddl(store).strip()]
    for stream in streams:
        parts += [
            f"-- aggregated stream {stream}",
            migrations.stream_migration_ddl(stream, store).strip(),
        ]
        if reset_cursors:
            parts.append(f"DELETE FROM {_names.cursor_table(stream)};")
    for name in subscriptions:
        parts += [
            f"-- subscription state {name}",
            migrations.subscription_migration_ddl(name).strip(),
        ]
    if depeche_db_0_14:
        parts += [
            "-- depeche-db 0.14's tables",
            migrations.depeche_db_0_14_ddl(store, streams).strip(),
        ]
    return "\n\n".join(parts) + "\n"


def _version(text: str) -> tuple[int, int]:
    try:
        major, minor, *_ = (int(part) for part in text.split("."))
    except ValueError:
        raise ConfigError(f"{text!r} is not a version: write it as 0.13 or 0.13.1") from None
    return major, minor


def run_generate_migration_script(args: argparse.Namespace) -> int:
    """`generate-migration-script PREV TARGET`, as depeche-db's command prints it."""
    prev, target = _version(args.prev_version), _version(args.target_version)
    _validate_names(args.message_store, args.aggregated_streams)
    for version, generators in AggregatedStream.migration_script_generators().items():
        if not prev <= version <= target:
            continue
        print("-- Migration for version:", ".".join(map(str, version)))
        for stream in args.aggregated_streams:
            print(f"-- Migration for aggregated stream: {stream}")
            for generator in generators:
                print(generator(stream, args.message_store))
            print()
    return 0


def run_migrate(args: argparse.Namespace) -> int:
    """Run `depeche-rs migrate`; returns the exit status."""
    streams = list(dict.fromkeys(args.stream or []))
    subscriptions = list(dict.fromkeys(args.subscription or []))
    script = migration_script(
        args.store, streams, subscriptions, args.reset_cursors, args.depeche_db_0_14
    )
    if not args.apply:
        # A printed script is for psql: one transaction, all or nothing.
        print(
            "-- depeche-rs migrate: brings depeche-db layouts to depeche-rs's; idempotent\n"
            f"BEGIN;\n\n{script}\nCOMMIT;",
        )
        return 0
    dsn = resolve_dsn(args.dsn, {})
    objects = ", ".join([f"store {args.store}", *(f"aggregated stream {s}" for s in streams)])
    objects += "".join(f", subscription state {s}" for s in subscriptions)
    try:
        with psycopg.connect(dsn, application_name="depeche-rs migrate") as conn:
            # No parameters: the DDL holds literal % signs (LIKE patterns, format strings).
            conn.execute(script.encode())
    except psycopg.OperationalError as exc:
        print(f"depeche-rs migrate: cannot connect to {redact(dsn)}: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        print(
            f"depeche-rs migrate: the migration failed and was rolled back: {exc}",
            file=sys.stderr,
        )
        return 1
    print(f"migrated {objects}")
    return 0
