"""Every public name of depeche-db 0.13.1 exists in depeche_rs with a compatible signature,
and every public module path of depeche-db imports from depeche_rs under the same dotted
name with the same public names, or is listed as missing on purpose
(scripts/compat_matrix.py prints the matrix in CI)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("depeche_db", reason="install the test extra: depeche-db==0.13.1")


def _compat_matrix() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "scripts" / "compat_matrix.py"
    spec = importlib.util.spec_from_file_location("compat_matrix", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compatibility_matrix_has_no_gaps() -> None:
    table = _compat_matrix().table()
    gaps = [
        (name, status, detail)
        for name, status, detail in table
        if status in ("MISSING", "DIFFERENT")
    ]
    assert gaps == []
    assert len(table) > 100


def test_matrix_checks_every_public_module_path_of_depeche_db() -> None:
    checked = {name for name, _, _ in _compat_matrix().table() if name.startswith("module ")}
    assert checked == {
        f"module depeche_db{suffix}"
        for suffix in (
            "",
            "._aggregated_stream",
            ".event_sourcing",
            ".event_sourcing.aggregate_root",
            ".event_sourcing.repository",
            ".experimental",
            ".experimental.threaded_executor",
            ".tools",
            ".tools.async_pg_notification_listener",
            ".tools.db_lock_provider",
            ".tools.db_subscription_state_provider",
            ".tools.immem_subscription",
            ".tools.pg_notification_listener",
            ".tools.pydantic_message_serializer",
            ".tools.stream_name_partitioner",
        )
    }


def test_module_paths_hold_the_same_objects_as_the_package() -> None:
    # One home per concept: a module path re-exports, it does not define a second class.
    from depeche_rs import FullUpdateResult
    from depeche_rs._aggregated_stream import FullUpdateResult as from_private
    from depeche_rs.experimental.threaded_executor import ThreadedExecutor
    from depeche_rs.tools import AsyncPgNotificationListener, PgNotificationListener
    from depeche_rs.tools.async_pg_notification_listener import (
        AsyncPgNotificationListener as from_async_path,
    )
    from depeche_rs.tools.pg_notification_listener import (
        PgNotificationListener as from_path,
    )

    assert from_private is FullUpdateResult
    assert from_async_path is AsyncPgNotificationListener
    assert from_path is PgNotificationListener
    assert ThreadedExecutor.__module__ == "depeche_rs.experimental.threaded_executor"
