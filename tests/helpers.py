"""Helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

from gan.engine import EngineConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


def shipped_params() -> dict:
    """The project's params.yaml as shipped: the one owner of the defaults."""
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def engine_config(**overrides) -> EngineConfig:
    """The engine's knobs as params.yaml ships them, with ``overrides``."""
    return EngineConfig.from_mapping({**shipped_params()["train"], **overrides})
