"""The mixed chaos run: concurrent writers, projectors and subscribers in separate
processes, killed with SIGKILL and disconnected with pg_terminate_backend at random
moments, one projector under a statement timeout of a few milliseconds.

At the end: every committed matching message is projected exactly once, nothing else is;
positions are 0..n-1 in every partition; each origin stream is in version order; every
projected message reached both subscriptions, first deliveries in position order per
partition; the SINGLE one, acknowledging in the handler's transaction, exactly once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from ._harness import Settings, private_database
from ._scenario import Plan, Scenario

pytestmark = pytest.mark.chaos

SETTINGS = Settings.from_env()


@pytest.mark.timeout(SETTINGS.seconds + 240)
def test_kills_and_terminations_lose_and_duplicate_nothing(
    dsn: str, tmp_path: Path, settings: Settings, report: Callable[[str], None]
) -> None:
    plan = Plan(
        seconds=settings.seconds,
        writers=settings.scaled(3),
        streams=settings.scaled(300),
    )
    with private_database(dsn, f"chaos_{uuid.uuid4().hex[:12]}") as database:
        scenario = Scenario(database, tmp_path, settings, plan)
        verdict = scenario.run()
    report(verdict.line())
    report("; ".join(scenario.timeline))
    assert not verdict.problems, "\n".join(verdict.problems[:40])
