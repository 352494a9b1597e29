"""preprocess@<dataset>: raw IDX files -> data/processed/<dataset>.{npz,json,png}.

The npz holds exactly x_train (N,28,28) uint8, y_train (N,) int64, x_test, y_test.
The json holds counts, pixel mean/std and class histograms; the png is a grid of
real samples, the reference picture the train stage logs next to its own.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from gan.data import DATASETS, idx_file_name, load_idx_split, sample_gaussian1d, to_unit_range
from gan.images import density_plot, image_grid, save_png
from pipeline.config import Config
from pipeline.artifacts import processed_paths, raw_dir, writable_folder

# The toy set's size: as large as MNIST's splits, cheap to sample.
TOY_TRAIN, TOY_TEST = 60_000, 10_000
GRID_IMAGES = 64


def _idx_arrays(dataset: str) -> dict[str, np.ndarray]:
    folder, arrays = raw_dir(dataset), {}
    for split in ("train", "test"):
        arrays[f"x_{split}"], arrays[f"y_{split}"] = load_idx_split(
            folder / idx_file_name(f"{split}_images"), folder / idx_file_name(f"{split}_labels"), DATASETS[dataset])
    return arrays


def _toy_arrays(seed: int) -> dict[str, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    sample = lambda n: sample_gaussian1d(n, generator).numpy()
    return {"x_train": sample(TOY_TRAIN), "y_train": np.zeros(TOY_TRAIN, np.int64),
            "x_test": sample(TOY_TEST), "y_test": np.zeros(TOY_TEST, np.int64)}


def summarize(arrays: dict[str, np.ndarray], num_classes: int) -> dict:
    summary = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        scaled = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
        summary[split] = {
            "count": int(len(x)),
            "pixel_mean": float(scaled.mean()),
            "pixel_std": float(scaled.std()),
            "class_histogram": np.bincount(y, minlength=num_classes).tolist(),
        }
    return summary


def run(cfg: Config, dataset: str) -> dict:
    spec, paths = DATASETS[dataset], processed_paths(dataset)
    writable_folder(paths["npz"].parent)  # before the parsing, which takes a while
    arrays = _idx_arrays(dataset) if spec.kind == "idx" else _toy_arrays(cfg.train.seed)
    if cfg.data.train_images:  # the test split stays whole: the quality floor is measured on it
        first = slice(cfg.data.train_images)
        arrays.update(x_train=arrays["x_train"][first], y_train=arrays["y_train"][first])
    np.savez(paths["npz"], **arrays)
    summary = {"dataset": dataset, "shape": list(spec.shape), "classes": list(spec.classes),
               **summarize(arrays, max(len(spec.classes), 1))}
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    if spec.kind == "idx":
        images = torch.from_numpy(arrays["x_train"][:GRID_IMAGES]).unsqueeze(1)
        save_png(image_grid(to_unit_range(images), nrow=8), paths["png"])
    else:
        density_plot(arrays["x_train"], None, paths["png"])
    print(f"preprocess@{dataset}: {summary['train']['count']} train / {summary['test']['count']} test "
          f"-> {paths['npz']}")
    return summary
