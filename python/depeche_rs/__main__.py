"""The `depeche-rs` command.

- `demo` runs the main job end to end and prints figures;
- `project` keeps aggregated streams up to date (see docs/cli.md);
- `status` prints backlogs and subscription lags;
- `migrate` prints or applies the DDL bringing depeche-db's tables to ours;
- `generate-migration-script` is depeche-db's command of that name (same arguments).

Exit statuses: 0 success or clean stop, 1 unrecoverable error, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import _cli, _demo


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `depeche-rs` console script."""
    parser = argparse.ArgumentParser(
        prog="depeche-rs",
        description="PostgreSQL message store with a Rust projector (drop-in for depeche-db).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="write, project and read back messages, printing what happened"
    )
    demo.add_argument("--dsn", help="PostgreSQL URL; default: an embedded server in ./.depeche-rs")
    demo.add_argument("--messages", type=int, default=50_000, help="messages to write")
    demo.add_argument("--streams", type=int, default=5_000, help="origin streams")
    _cli.add_commands(commands)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo.run(args.dsn, args.messages, args.streams)
    return _cli.run_command(args)


if __name__ == "__main__":
    sys.exit(main())
