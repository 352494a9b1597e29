"""The sweep's two pictures: the metric against the learning rates, and the best trial's grid beside the worst's."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image


def metric_figure(table: pd.DataFrame, metric: str, path: Path) -> None:
    """The metric against lr_g and lr_d, coloured by the D:G step ratio."""
    figure = Figure(figsize=(10, 4), dpi=100)
    finite = table[np.isfinite(table[metric].astype(float))]
    ratio = [f"{d}:{g}" for d, g in zip(_column(finite, "d_steps"), _column(finite, "g_steps"))]
    for index, lr in enumerate(("lr_g", "lr_d")):
        axes = figure.add_subplot(1, 2, index + 1)
        for label in sorted(set(ratio)):
            mask = [r == label for r in ratio]
            axes.scatter(_column(finite, lr)[mask], finite[metric][mask], label=f"D:G {label}")
        axes.set_xscale("log")
        axes.set_xlabel(lr)
        axes.set_ylabel(metric)
        axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def _column(table: pd.DataFrame, key: str) -> np.ndarray:
    """A swept column, or the params.yaml default when the key was not swept."""
    if key in table:
        return table[key].to_numpy()
    defaults = {"d_steps": 1, "g_steps": 1, "lr_g": math.nan, "lr_d": math.nan}
    return np.full(len(table), defaults[key])


def best_vs_worst(table: pd.DataFrame, path: Path) -> bool:
    """The best and the worst ranked trial's last sample grids side by side."""
    ranked = table[(table["checkpoint"] != "") & table["status"].isin(["completed", "stopped_early"])]
    if ranked.empty:
        return False
    grids = [np.asarray(Image.open(Path(ranked.iloc[i]["checkpoint"]) / "samples.png").convert("L"))
             for i in (0, -1)]
    height = max(grid.shape[0] for grid in grids)  # a conditional grid has a row per class
    grids = [np.pad(grid, ((0, height - grid.shape[0]), (0, 0))) for grid in grids]
    gap = np.full((height, 8), 255, np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.hstack([grids[0], gap, grids[1]])).save(path)
    return True
