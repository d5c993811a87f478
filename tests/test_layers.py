"""The layer contract: who may import whom (pyproject.toml, [tool.importlinter]; docs/architecture.md)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_layers_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_every_engine_module_is_placed_in_a_layer():
    """A module left out of the contract would escape it: each module or subpackage of engine/ must be named."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    named = {name.strip() for contract in config["contracts"] for layer in contract["layers"]
             for sibling in layer.replace("|", ":").split(":") for name in [sibling] if name.strip()}
    engine = ROOT / "engine"
    modules = {f"engine.{p.stem}" for p in engine.glob("*.py") if p.stem != "__init__"}
    modules |= {f"engine.{p.parent.name}" for p in engine.glob("*/__init__.py")}
    assert modules - named == set()
    assert {"scheduler", "workers"} <= named
