"""Named recipes: YAML files of params overrides under ``presets/``, applied over params.yaml.

Each preset reproduces the settings of a classic tutorial, cited in its file. Choose
one with ``preset: <name>`` in params.yaml, ``dvc exp run -S preset=<name>`` or
``ganpipe train --preset <name>``: the keys the preset sets replace params.yaml's,
everything else comes from params.yaml. Plain YAML and no validation here (that is
``pipeline.config``'s job), so torch-only benchmark machines can use it too.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

PRESETS_FOLDER = "presets"  # beside params.yaml, in the project root


class ParamsFileError(ValueError):
    """A params or preset file that cannot be read as a mapping; one line naming the file and the problem."""


class PresetError(ParamsFileError):
    """An unknown or unreadable preset; the message names it and the ones that exist."""


class NumbersLoader(yaml.SafeLoader):
    """YAML as written by people: ``1e-3`` is a float (YAML 1.2), not the string PyYAML's 1.1 rules make it."""


NumbersLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_mapping(path: Path, what: str = "sections", shown: str | None = None) -> dict[str, Any]:
    """A YAML file of nested mappings (an empty file is {}); anything else is one ``ParamsFileError`` line, which
    names the file as ``shown`` (default: its path)."""
    shown = shown or str(path)
    if path.is_dir():
        raise ParamsFileError(f"{shown}: is a folder, not a YAML file")
    try:
        data = yaml.load(path.read_text(), Loader=NumbersLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({err.context})" if err.context else ""
        raise ParamsFileError(f"{shown}: not valid YAML{where}: {err.problem}{context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ParamsFileError(f"{shown}: not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsFileError(f"{shown}: must hold a mapping of {what}, found a {type(data).__name__}")
    return data


def available(root: Path) -> list[str]:
    return sorted(path.stem for path in (root / PRESETS_FOLDER).glob("*.yaml"))


def preset_overrides(name: str, root: Path) -> dict[str, Any]:
    """The nested params a preset sets."""
    path = root / PRESETS_FOLDER / f"{name}.yaml"
    if not path.is_file():
        raise PresetError(f"preset = {name!r} is not one of: {', '.join(available(root)) or '(none found)'}")
    try:
        return read_mapping(path, "params sections", shown=f"{PRESETS_FOLDER}/{name}.yaml")
    except ParamsFileError as err:
        raise PresetError(f"preset {name!r}: {err}") from None


def apply_preset(raw: dict[str, Any], root: Path) -> dict[str, Any]:
    """``raw`` with its ``preset``'s values merged over it (a copy; unchanged without a preset).

    A preset only sets keys params.yaml has (it lists them all): any other is the preset's mistake, said as such.
    """
    name = raw.get("preset")
    if not name:
        return raw
    overrides = preset_overrides(name, root)
    for section, values in overrides.items():
        keys = values if isinstance(values, dict) else {}
        for key in [None, *keys]:
            base = raw.get(section) if key is None else (raw.get(section) or {})
            if not isinstance(base, dict) or (key is not None and key not in base):
                dotted = section if key is None else f"{section}.{key}"
                raise PresetError(f"preset {name!r}: {PRESETS_FOLDER}/{name}.yaml sets '{dotted}', which is not a "
                                  "key of params.yaml")
    return merge(raw, overrides)


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
