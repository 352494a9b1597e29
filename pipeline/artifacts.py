"""Where each stage's outputs live, and how the stages after it read them.

One place for the paths dvc.yaml lists (data/raw, data/processed, models/evaluator),
so a stage reads another's output without importing that stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def raw_dir(dataset: str) -> Path:
    return Path("data") / "raw" / dataset


def processed_paths(dataset: str) -> dict[str, Path]:
    base = Path("data") / "processed" / dataset
    return {"npz": base.with_suffix(".npz"), "json": base.with_suffix(".json"),
            "png": base.parent / f"{dataset}_real.png"}


def load_processed(dataset: str, root: Path = Path(".")) -> dict[str, np.ndarray]:
    with np.load(root / processed_paths(dataset)["npz"]) as arrays:
        return {key: arrays[key] for key in arrays.files}


def evaluator_paths(dataset: str, root: Path = Path(".")) -> dict[str, Path]:
    return {"model": root / "models" / "evaluator" / f"{dataset}.pt",
            "yardstick": root / "metrics" / "evaluator" / f"{dataset}.json",
            "metrics": root / "metrics" / dataset / "evaluator.json"}


