"""The `depeche-rs` command: `demo` runs the main job end to end and prints figures."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import _demo


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
    demo.add_argument("--messages", type=int, default=100_000, help="messages to write")
    demo.add_argument("--streams", type=int, default=10_000, help="origin streams")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo.run(args.dsn, args.messages, args.streams)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
