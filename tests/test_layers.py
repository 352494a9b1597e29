"""The layers are a contract a tool checks: `lint-imports` reads them from pyproject.toml."""

from __future__ import annotations

import os
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


def test_each_contract_fails_when_its_rule_is_broken(tmp_path):
    """A contract that cannot fail checks nothing: one forbidden import each, in a copy, and each is named broken."""
    import shutil
    import tomllib

    for package in ("gan", "pipeline"):
        shutil.copytree(REPO_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path)
    breaches = {"gan/models.py": "import pipeline.config",  # gan reaches up into the pipeline
                "pipeline/config.py": "import pipeline.train",  # a shared service imports a stage
                "gan/conditioning.py": "import gan.engine"}  # a part of the engine imports the trainer
    for path, line in breaches.items():
        with open(tmp_path / path, "a") as module:
            module.write(f"\n{line}  # noqa\n")
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-2000:]
    contracts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert f"0 kept, {len(contracts)} broken" in result.stdout, result.stdout[-4000:]
