"""What a user gets from `pip install depeche-rs`: one version everywhere, and an import that
loads the library alone (no command-line dependencies, no embedded server)."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import depeche_rs
from depeche_rs import _native

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

CARGO_TOML = Path(__file__).resolve().parent.parent / "Cargo.toml"


def test_version_is_cargos_everywhere() -> None:
    cargo = tomllib.loads(CARGO_TOML.read_text())["package"]["version"]
    assert _native.__version__ == cargo
    assert depeche_rs.__version__ == cargo
    assert importlib.metadata.version("depeche-rs") == cargo
