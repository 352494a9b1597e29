"""Where each stage's outputs live, and how the stages after it read them.

One place for the paths dvc.yaml lists (data/raw, data/processed, models/evaluator),
so a stage reads another's output without importing that stage.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


class NotWritableError(RuntimeError):
    """A stage's output folder cannot be created or written: a local problem, never a mirror's."""


def writable_folder(folder: Path) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it, before any work is done."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        in_the_way = next((path for path in [*reversed(folder.parents), folder] if path.is_file()), None)
        if in_the_way is not None:
            raise NotWritableError(f"{folder}: cannot write there: {in_the_way} is a file, not a folder; "
                                   "move it away") from None
        raise NotWritableError(f"{folder}: cannot write there ({err.strerror or err}): make it writable") from None
    return folder


def raw_dir(dataset: str) -> Path:
    return Path("data") / "raw" / dataset


def processed_paths(dataset: str) -> dict[str, Path]:
    base = Path("data") / "processed" / dataset
    return {"npz": base.with_suffix(".npz"), "json": base.with_suffix(".json"),
            "png": base.parent / f"{dataset}_real.png"}


def load_processed(dataset: str, root: Path = Path(".")) -> dict[str, np.ndarray]:
    path = root / processed_paths(dataset)["npz"]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no processed data for {dataset}: run `dvc repro preprocess@{dataset}`")
    with np.load(path) as arrays:
        return {key: arrays[key] for key in arrays.files}


def evaluator_paths(dataset: str, root: Path = Path(".")) -> dict[str, Path]:
    return {"model": root / "models" / "evaluator" / f"{dataset}.pt",
            "yardstick": root / "metrics" / "evaluator" / f"{dataset}.json",
            "metrics": root / "metrics" / dataset / "evaluator.json"}


