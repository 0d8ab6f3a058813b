"""Starting `harness.child` processes with the same interpreter and import path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .libraries import Library

BENCH_DIR = Path(__file__).resolve().parent.parent


def child_command(mode: str, lib: Library, engine_kind: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "harness.child",
        mode,
        "--lib",
        lib.name,
        "--dsn",
        lib.dsn,
        "--engine",
        engine_kind,
        *args,
    ]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(BENCH_DIR) + (os.pathsep + path if path else "")
    # Unbuffered, so "ready" and errors reach the harness as they happen.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_child(command: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command,
        env=child_env(),
        cwd=BENCH_DIR,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
