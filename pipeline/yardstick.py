"""The yardstick every quality score is read against: the evaluator stage's network and the real reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gan.data import DATASETS
from gan.evaluator_net import load_evaluator
from gan.metrics import real_reference
from pipeline.artifacts import evaluator_paths, load_processed


def load_reference(dataset: str, root: Path, device: torch.device, arrays: dict[str, np.ndarray] | None = None):
    """(evaluator, real reference) for per-epoch quality evaluation of ``dataset`` (``arrays``: its loaded npz)."""
    arrays = load_processed(dataset, root) if arrays is None else arrays
    path = evaluator_paths(dataset, root)["model"]
    if DATASETS[dataset].kind == "toy":
        return None, torch.from_numpy(arrays["x_test"]).to(device)
    evaluator = load_evaluator(path, device)
    return evaluator, real_reference(evaluator, torch.from_numpy(arrays["x_test"]),
                                     torch.from_numpy(arrays["y_test"]), device)
