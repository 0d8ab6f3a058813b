"""Every public name of depeche-db 0.13.1 exists in depeche_rs with a compatible signature,
or is listed as missing on purpose (scripts/compat_matrix.py prints the matrix in CI)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("depeche_db", reason="install the test extra: depeche-db==0.13.1")


def test_compatibility_matrix_has_no_gaps() -> None:
    path = Path(__file__).resolve().parents[1] / "scripts" / "compat_matrix.py"
    spec = importlib.util.spec_from_file_location("compat_matrix", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import depeche_db
    import depeche_db.tools

    import depeche_rs
    import depeche_rs.tools

    table = list(module.rows(depeche_db, depeche_rs)) + list(
        module.rows(depeche_db.tools, depeche_rs.tools)
    )
    gaps = [
        (name, status, detail)
        for name, status, detail in table
        if status in ("MISSING", "DIFFERENT")
    ]
    assert gaps == []
    assert len(table) > 100
