"""Running `depeche-rs` in subprocesses for the CLI tests (no tests here).

`Command` starts `python -m depeche_rs ...` from the repository root (so that
`tests.test_cli_app:...` imports), reads its JSON log lines on a thread, and is always
stopped, reaped and its pipes closed by the `cli` fixture.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parents[1]


class Command:
    """One `depeche-rs` subprocess and the events it logged."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k != "DEPECHE_RS_DSN"} | (env or {})
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "depeche_rs", *args],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    pass
                self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def named(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        """The events called `name` whose fields match `fields`."""
        with self._changed:
            return [
                e
                for e in self.events
                if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
            ]

    def wait_for(self, name: str, timeout: float = 15.0, **fields: Any) -> dict[str, Any]:
        """The first event `name` (with `fields`), waiting up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = self.named(name, **fields)
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no {name} event {fields or ''} (exit {self.proc.poll()}); "
                        f"output:\n{self.output()}"
                    )
                self._changed.wait(min(left, 0.1))

    def wait(self, timeout: float = 15.0) -> int:
        """Wait for the exit; returns the exit status."""
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running after {timeout} s; output:\n{self.output()}"
            ) from None
        self._reader.join(timeout=5)
        return status

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send `signum`, wait for the exit; returns the exit status."""
        self.proc.send_signal(signum)
        return self.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def commands() -> Iterator[Callable[..., Command]]:
    """For a `cli` fixture: start `depeche-rs` subprocesses; all are killed and reaped
    afterwards."""
    started: list[Command] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Command:
        command = Command(list(args), env)
        started.append(command)
        return command

    yield start
    for command in started:
        command.close()


def forget_registrations(dsn: str, stream_name: str) -> None:
    """Remove the test's rows from the shared projector registry."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('depeche_rs_projectors')").fetchone() != (None,):
            conn.execute(
                "DELETE FROM depeche_rs_projectors WHERE stream LIKE %s", (stream_name + "%",)
            )


def scrape(port: int) -> dict[str, Any]:
    """GET /metrics and parse it: {"types": {family: type}, "samples": {(name, labels): v}}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = response.read().decode()
    types: dict[str, str] = {}
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ")
            types[family] = kind
            continue
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        name, _, rest = series.partition("{")
        labels: list[tuple[str, str]] = []
        for pair in filter(None, rest.rstrip("}").split(",")):
            key, _, quoted = pair.partition("=")
            assert quoted.startswith('"') and quoted.endswith('"'), line
            labels.append((key, quoted[1:-1]))
        samples[(name, tuple(labels))] = float(value)
    return {"types": types, "samples": samples}
