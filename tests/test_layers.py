"""The layers are a contract a tool checks: `lint-imports` reads them from pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import REPO_ROOT


def test_the_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_every_pipeline_module_has_its_layer():
    """A module no layer names escapes the contract: each one is placed."""
    import re
    import tomllib

    contracts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c.get("containers") == ["pipeline"]]
    placed = {name.strip() for layer in layers for name in re.split(r"[|:]", layer)}
    modules = {path.stem for path in (REPO_ROOT / "pipeline").glob("*.py")} - {"__init__"}
    assert placed == modules, (modules - placed, placed - modules)
