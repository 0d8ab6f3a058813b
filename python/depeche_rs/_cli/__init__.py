"""The subcommands of the `depeche-rs` command: `project`, `status` and `migrate`.

One concept per module: `_args` (argument parsers), `_config` (settings from arguments
and TOML), `_project` (setting a projector process up and tearing it down), `_loop` (its
hooks on the library's live runtime, `.._runtime.live`), `_control` (the hot-standby lock),
`_catalog` (what the database holds: backlog, lock holder, registry), `_metrics`
(Prometheus), `_progress` and `_logging` (what a person reads), `_signals` (clean stop),
`_status`, `_migrate`, `_json_messages` (messages without a serializer). See docs/cli.md.
"""

from __future__ import annotations

from ._args import add_commands, run_command

__all__ = ["add_commands", "run_command"]
