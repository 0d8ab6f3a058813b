"""PostgreSQL restarted under a running system: writers, projectors and subscribers keep
going through two restarts of a server the test owns (a private embedded one), plus
kills and terminated connections, and nothing is lost or duplicated."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from depeche_rs._embedded import start_embedded, stop_embedded

from ._harness import Settings, derive_seed
from ._scenario import Plan, Scenario

pytestmark = pytest.mark.chaos

SETTINGS = Settings.from_env()
SECONDS = max(8.0, SETTINGS.seconds * 0.5)


@pytest.mark.timeout(SECONDS + 240)
def test_server_restarts_lose_and_duplicate_nothing(
    tmp_path: Path, settings: Settings, report: Callable[[str], None]
) -> None:
    data_dir = tmp_path / "pgdata"
    rng = random.Random(derive_seed(settings.seed, "restart"))

    def restart() -> str:
        stop_embedded(data_dir)
        time.sleep(rng.uniform(0.1, 1.0))
        return start_embedded(data_dir)

    plan = Plan(
        seconds=SECONDS,
        writers=2,
        projectors=2,
        statement_timeout=False,
        subscribers_per_subscription=1,
        faults={"kill_projector": 1, "kill_subscriber": 1, "terminate_any": 1},
        server_restarts=(0.3, 0.65),
    )
    workdir = tmp_path / "run"
    workdir.mkdir()
    try:
        started = time.monotonic()
        dsn = start_embedded(data_dir)
        report(f"private server up in {time.monotonic() - started:.1f}s")
        scenario = Scenario(dsn, workdir, settings, plan, restart_server=restart)
        verdict = scenario.run()
    finally:
        stop_embedded(data_dir)
    report(verdict.line())
    report("; ".join(scenario.timeline))
    assert verdict.figures["restarts"] == 2
    assert not verdict.problems, "\n".join(verdict.problems[:40])
