"""Pictures of what a GAN makes: uint8 sample grids, PNG files, the 1-D density plot."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state
from PIL import Image

from gan.data import to_uint8


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """Images in [-1, 1], shape (n, C, H, W), tiled ``nrow`` per row on a black background.

    Returns uint8 (H, W) for one channel, (H, W, 3) for three.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image_grid needs (n, C, H, W) with 1 or 3 channels, got {tuple(images.shape)}")
    pixels = to_uint8(images.cpu())
    n, channels, height, width = pixels.shape
    columns = min(nrow, n)
    rows = math.ceil(n / columns)
    grid = torch.zeros((channels, padding + rows * (height + padding), padding + columns * (width + padding)),
                       dtype=torch.uint8)
    for index, image in enumerate(pixels):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        grid[:, top:top + height, left:left + width] = image
    return grid[0].numpy() if channels == 1 else grid.permute(1, 2, 0).numpy()


def save_png(array: np.ndarray, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def density_plot(real: np.ndarray, generated: np.ndarray | None, path: str | Path,
                 decision: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Histograms of real and generated 1-D samples (real alone when ``generated`` is None);
    ``decision`` = (xs, D(xs) as probabilities) adds D's curve."""
    real = np.ravel(real)
    generated = np.ravel(generated) if generated is not None else real[:0]
    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.add_subplot()
    both = np.concatenate([real, generated])
    bins = np.linspace(both.min(), both.max(), 60)
    axes.hist(real, bins=bins, density=True, alpha=0.5, label="real")
    if len(generated):
        axes.hist(generated, bins=bins, density=True, alpha=0.5, label="generated")
    if decision is not None:
        axes.plot(*decision, color="black", label="D(x)")
    axes.set_xlabel("x")
    axes.set_ylabel("density / D(x)")
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
