"""Shared by the real-data benchmarks: the yardstick on a full dataset, and one config trained and scored.

Torch, NumPy and PyYAML only, so the benchmarks run on a GPU machine without
Ray, MLflow or DVC. A dataset folder is a ``data.mirrors`` folder: its four IDX files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gan.data import DeviceBatches, load_idx_split
from gan.engine import EngineConfig, GANTrainer
from gan.evaluator_net import EvaluatorNet, train_evaluator
from gan.images import image_grid
from gan.metrics import RealReference, evaluate, real_reference, reference_scores
from gan.models import build_models

QUALITY_KEYS = ("fid", "kid", "inception_score", "class_coverage", "class_kl", "precision", "recall")
# Conditional rows also keep these, and the floor has them from replaying each class's train images.
CLASS_KEYS = ("cond_accuracy", "precision_within_class", "recall_within_class")
CLASSES = 10  # MNIST and Fashion-MNIST: what a conditional row is conditioned on


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    return load_idx_split(folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz")


@dataclass
class Yardstick:
    """The evaluator@<ds> stage's outputs, made here: the evaluator, the real reference and the floor."""

    x_train: np.ndarray
    y_train: np.ndarray  # a conditional row's labels
    evaluator: EvaluatorNet
    reference: RealReference
    test_accuracy: float
    seconds: float
    floor: dict[str, float]  # real train vs real test
    noise_fid: float


def yardstick(folder: Path, evaluator_params: dict, device: torch.device, n: int) -> Yardstick:
    """Train the evaluator on the full train split with params.yaml's ``evaluator`` settings; score the ends."""
    (x_train, y_train), (x_test, y_test) = load_split(folder, "train"), load_split(folder, "test")
    started = time.perf_counter()
    evaluator, scores = train_evaluator(x_train, y_train, x_test, y_test, epochs=evaluator_params["epochs"],
                                        batch_size=evaluator_params["batch_size"], lr=evaluator_params["lr"],
                                        seed=evaluator_params["seed"], device=device)
    seconds = time.perf_counter() - started
    ends = reference_scores(evaluator, x_train, x_test, y_test, n=n, device=device, real_train_labels=y_train)
    return Yardstick(x_train, y_train, evaluator, real_reference(evaluator, x_test, y_test, device), scores["test_accuracy"],
                     seconds, {key: ends["real_vs_real"][key] for key in (*QUALITY_KEYS, *CLASS_KEYS)},
                     ends["noise"]["fid"])


def train_and_score(params: dict, stick: Yardstick, device: torch.device, *, epochs: int, score_at: list[int],
                    eval_samples: int) -> dict:
    """params' model and train sections through the engine, as rank 0 of a 1-worker train@<ds> runs them.

    Scored with the evaluator after each epoch in ``score_at`` (and the last). Returns the
    scores per scored epoch (with that epoch's training and scoring seconds), the total
    training seconds (evaluation excluded), img/s and the final sample grid.
    """
    model, train = params["model"], params["train"]
    torch.manual_seed(train["seed"])
    generator, discriminator = build_models(
        model["name"], (1, 28, 28), latent_dim=model["latent_dim"], hidden=tuple(model["hidden"]),
        channels=model["channels"], dropout=model["dropout"], activation=model.get("activation", "leaky_relu"),
        spectral_norm=model.get("spectral_norm", False), conditional=model.get("conditional", "none"),
        num_classes=CLASSES, label_embedding=model["label_embedding"])
    trainer = GANTrainer(generator, discriminator, EngineConfig.from_mapping(train), device=device,
                         seed=train["seed"] + 1000)
    conditional = model.get("conditional", "none") != "none"
    labels = torch.from_numpy(stick.y_train).to(device) if conditional else None
    batches = DeviceBatches(torch.from_numpy(stick.x_train).to(device), train["batch_size"], seed=train["seed"],
                            labels=labels)
    scores, train_seconds, images = [], 0.0, 0
    for epoch in range(1, epochs + 1):
        result = trainer.train_epoch(batches)  # ends with a read-back: the device is idle after it
        train_seconds += result.seconds
        images += round(result.images_per_sec * result.seconds)
        if epoch in score_at or epoch == epochs:
            started = time.perf_counter()
            quality = evaluate(trainer.sample, stick.evaluator, stick.reference, n=eval_samples, device=device,
                               conditional=conditional)
            scores.append({"epoch": epoch, "images_seen": images, "epoch_seconds": result.seconds,
                           "epoch_img_per_s": result.images_per_sec, "eval_seconds": time.perf_counter() - started,
                           **{key: quality[key] for key in QUALITY_KEYS},
                           **{key: value for key, value in quality.items()
                              if key.startswith(("cond_", "fid_class", "recall_class")) or key in CLASS_KEYS}})
    grid = image_grid(trainer.sample(noise=trainer.fixed_noise, labels=trainer.fixed_labels), nrow=8)
    return {"scores": scores, "train_seconds": train_seconds, "img_per_s": images / train_seconds,
            "graph_ran": trainer.use_graph, "graph_fallback_reason": trainer.graph_fallback_reason, "grid": grid}
