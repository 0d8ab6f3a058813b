"""Argument parsers of `project`, `status` and `migrate`, and their dispatch.

Exit statuses: 0 done or stopped cleanly, 1 an error no retry can fix (including a
database that cannot be reached at start, and every aggregated stream of a `project`
process stuck), 2 bad arguments or configuration (argparse exits with 2 by itself;
`ConfigError` is turned into 2 here), 3 `status --check` found a stuck stream.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._config import DSN_ENV, LOG_FORMATS, LOG_LEVELS, ConfigError, project_settings
from ._migrate import run_generate_migration_script, run_migrate
from ._project import run_project
from ._signals import Abandoned
from ._status import run_status

EXIT_OK = 0
EXIT_USAGE = 2

_DSN_HELP = f"PostgreSQL URL (default: ${DSN_ENV}, or dsn in the config file)"


def _add_project(commands: Any) -> None:
    p = commands.add_parser(
        "project",
        help="keep aggregated streams up to date: catch up, then stay live (hot standby ready)",
        description=(
            "Project origin streams into aggregated streams continuously: create what is "
            "missing, catch up with a progress display, then project each new message as "
            "its NOTIFY arrives (polling as a safety net). Several instances may run for "
            "the same stream: one projects, the others stand by and take over within a "
            "poll interval when it stops. SIGTERM/SIGINT stop cleanly (exit 0)."
        ),
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with [[streams]] (see docs/cli.md)")
    p.add_argument("--dsn", help=_DSN_HELP)
    p.add_argument("--store", help="message store name")
    p.add_argument("--stream", help="aggregated stream name")
    p.add_argument(
        "--wildcard",
        action="append",
        metavar="PATTERN",
        help="LIKE pattern of origin streams, e.g. 'account-%%' (repeatable)",
    )
    p.add_argument(
        "--partitioner",
        metavar="SPEC",
        help="stream-hash (depeche-db's StreamNamePartitioner), hash-mod:N, or module:attr",
    )
    p.add_argument("--batch-size", type=int, metavar="N", help="messages per batch (1000)")
    p.add_argument(
        "--serializer",
        metavar="MODULE:ATTR",
        help="the application's serializer; default: messages are their raw JSON objects",
    )
    p.add_argument(
        "--time-field",
        action="append",
        metavar="FIELD",
        help="JSON field holding the message time when no serializer is given (repeatable)",
    )
    for flag, help_text in (
        (
            "--poll-interval",
            "pass without a notification, and standby lock attempts, this often (1)",
        ),
        (
            "--stop-timeout",
            "after SIGTERM/SIGINT, abandon (roll back) a batch still running this late (3)",
        ),
        ("--progress-interval", "progress line this often when stderr is not a terminal (10)"),
    ):
        p.add_argument(flag, type=float, metavar="SECONDS", help=help_text)
    p.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics")
    p.add_argument("--metrics-host", metavar="HOST", help="address to serve them on (0.0.0.0)")
    p.add_argument("--log-format", choices=LOG_FORMATS, help="text (default) or json lines")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="info by default")
    p.add_argument(
        "--once", action="store_true", help="catch up, then exit instead of staying live"
    )


def _add_status(commands: Any) -> None:
    p = commands.add_parser(
        "status",
        help="backlog of each aggregated stream, lag of each subscription",
        description=(
            "Print, per aggregated stream, its partitions, messages, backlog and the age of "
            "the oldest unprojected message, and per subscription its total lag and the "
            "partitions lagging most."
        ),
    )
    p.add_argument("--dsn", help=_DSN_HELP)
    p.add_argument("--store", help="only this message store's streams and subscriptions")
    p.add_argument("--config", metavar="FILE", help="TOML file naming streams and wildcards")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--check",
        action="store_true",
        help="exit with status 3 when an aggregated stream is stuck (for health checks)",
    )
    p.add_argument("--top", type=int, default=5, metavar="N", help="partitions shown (0: all)")
    p.add_argument(
        "--subscription",
        action="append",
        metavar="NAME=STREAM",
        help="the aggregated stream of a subscription, when it cannot be inferred (repeatable)",
    )


def _add_migrate(commands: Any) -> None:
    p = commands.add_parser(
        "migrate",
        help="print (or --apply) the DDL bringing depeche-db tables to depeche-rs's layout",
        description=(
            "Print the idempotent DDL that brings a depeche-db store (and aggregated streams, "
            "subscription state tables) to depeche-rs's layout, or apply it in one transaction."
        ),
    )
    p.add_argument("--dsn", help=_DSN_HELP + "; needed with --apply")
    p.add_argument("--store", required=True, help="message store name")
    p.add_argument(
        "--stream", action="append", metavar="AGG", help="aggregated stream (repeatable)"
    )
    p.add_argument(
        "--subscription",
        action="append",
        metavar="NAME",
        help="subscription state table name (repeatable)",
    )
    p.add_argument(
        "--reset-cursors",
        action="store_true",
        help=(
            "also forget the projector cursors of the --stream aggregated streams, so their "
            "next projection rescans the store from the start (after restoring rows with "
            "triggers disabled; projects only what is missing)"
        ),
    )
    p.add_argument(
        "--depeche-db-0.14",
        dest="depeche_db_0_14",
        action="store_true",
        help=(
            "also create (or repair) depeche-db 0.14's tables, the store's _meta and the "
            "--stream aggregated streams' _omax, exactly, under locks (for databases that "
            "depeche-db 0.14 processes share)"
        ),
    )
    p.add_argument("--apply", action="store_true", help="apply it instead of printing it")


def _add_generate_migration_script(commands: Any) -> None:
    # depeche-db's `python -m depeche_db generate-migration-script`, same arguments.
    p = commands.add_parser(
        "generate-migration-script",
        help="depeche-db's migration script command: print the DDL for a version range",
        description=(
            "Print the migration DDL from depeche-db version PREV to TARGET for the given "
            "aggregated streams, as `python -m depeche_db generate-migration-script` does. "
            "Every step is depeche-rs's idempotent migration; the 0.14 step also creates "
            "depeche-db 0.14's tables."
        ),
    )
    p.add_argument("prev_version", help="previous version (e.g. '0.8')")
    p.add_argument("target_version", help="target version (e.g. '0.14')")
    p.add_argument("--message-store", required=True, help="name of the message store")
    p.add_argument(
        "--aggregated-stream",
        action="append",
        required=True,
        dest="aggregated_streams",
        help="name of an aggregated stream (repeatable)",
    )


def add_commands(commands: Any) -> None:
    """Add `project`, `status` and `migrate` to the `depeche-rs` subparsers."""
    _add_project(commands)
    _add_status(commands)
    _add_migrate(commands)
    _add_generate_migration_script(commands)


def run_command(args: argparse.Namespace) -> int:
    """Run `args.command`; returns the exit status."""
    try:
        if args.command == "project":
            return run_project(project_settings(args))
        if args.command == "status":
            return run_status(args)
        if args.command == "migrate":
            return run_migrate(args)
        if args.command == "generate-migration-script":
            return run_generate_migration_script(args)
    except ConfigError as exc:
        print(f"depeche-rs {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (Abandoned, KeyboardInterrupt):
        # A stop signal before the loop was running, or after it ended.
        return EXIT_OK
    raise ValueError(f"unknown command {args.command!r}")
