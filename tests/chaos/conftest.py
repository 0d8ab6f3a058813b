"""Chaos suite fixtures: the settings, and a reporter whose lines reach the terminal
even under `pytest -q` without `-s` (and are repeated in a "chaos" summary section)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ._harness import Settings

_LINES: list[str] = []


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings.from_env()


@pytest.fixture()
def report(
    capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest, settings: Settings
) -> Callable[[str], None]:
    """Print a line to the terminal now, and again in the summary at the end."""

    def emit(line: str) -> None:
        _LINES.append(f"{request.node.name}: {line}")
        with capsys.disabled():
            print(f"\n[chaos {request.node.name}] {line}", flush=True)

    emit(
        f"seed={settings.seed} seconds={settings.seconds:g} scale={settings.scale:g} "
        f"(replay: DEPECHE_RS_CHAOS_SEED={settings.seed})"
    )
    return emit


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _LINES:
        terminalreporter.section("chaos")
        for line in _LINES:
            terminalreporter.write_line(line)
