"""Named recipes: YAML files of params overrides under ``presets/``, applied over params.yaml.

Each preset reproduces the settings of a classic tutorial, cited in its file. Choose
one with ``preset: <name>`` in params.yaml, ``dvc exp run -S preset=<name>`` or
``ganpipe train --preset <name>``: the keys the preset sets replace params.yaml's,
everything else comes from params.yaml. Plain YAML and no validation here (that is
``pipeline.config``'s job), so torch-only benchmark machines can use it too.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

PRESETS_FOLDER = "presets"  # beside params.yaml, in the project root


class PresetError(ValueError):
    """An unknown or unreadable preset; the message names it and the ones that exist."""


def available(root: Path) -> list[str]:
    return sorted(path.stem for path in (root / PRESETS_FOLDER).glob("*.yaml"))


def preset_overrides(name: str, root: Path) -> dict[str, Any]:
    """The nested params a preset sets."""
    path = root / PRESETS_FOLDER / f"{name}.yaml"
    if not path.is_file():
        raise PresetError(f"preset = {name!r} is not one of: {', '.join(available(root)) or '(none found)'}")
    overrides = yaml.safe_load(path.read_text()) or {}
    if not isinstance(overrides, dict):
        raise PresetError(f"preset {name!r}: {path.name} must hold a mapping of params sections")
    return overrides


def apply_preset(raw: dict[str, Any], root: Path) -> dict[str, Any]:
    """``raw`` with its ``preset``'s values merged over it (a copy; unchanged without a preset)."""
    name = raw.get("preset")
    return merge(raw, preset_overrides(name, root)) if name else raw


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with nested ``overrides`` laid over it (mappings merge, the rest replaces)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with dotted keys set, e.g. {"train.lr_g": 1e-3}."""
    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
