"""`ganpipe sample` and `ganpipe evaluate`: use a trained generator.

A generator comes from a DVC output (models/<dataset>/generator.pt), a training
checkpoint (models/<dataset>/checkpoint.pt, built with params.yaml's model
section), or an MLflow run (its logged ``generator`` model).

A class-conditional generator (``model.conditional``) draws the classes it is
asked for: ``--label`` one class, ``--per-class K`` a grid of one row per class,
neither a grid of all classes in turn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from gan.conditioning import class_rows
from gan.data import DATASETS
from gan.images import image_grid, save_png
from gan.metrics import evaluate
from pipeline import tracking
from pipeline.config import Config, ModelConfig
from pipeline.evaluator import evaluator_paths, load_reference, pick_device


class SampleError(ValueError):
    """A request the generator cannot serve (e.g. a label for an unconditional model); one line."""


class Sampler:
    """``sampler(n)`` -> n generated samples in the data's range, seeded for reproducibility.

    A conditional generator (``num_classes`` > 0) takes ``labels=`` (int64, one per sample);
    without them it draws the classes in turn. An unconditional one refuses labels.
    """

    def __init__(self, model: Callable[..., torch.Tensor], latent_dim: int, num_classes: int,
                 device: torch.device, seed: int = 0):
        self.model, self.latent_dim, self.num_classes, self.device = model, latent_dim, num_classes, device
        self.noise_source = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def __call__(self, n: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        noise = torch.randn(n, self.latent_dim, generator=self.noise_source, device=self.device)
        if not self.num_classes:
            if labels is not None:
                raise SampleError("this generator is unconditional (model.conditional: none): it cannot draw a "
                                  "chosen class; train with model.conditional concat or projection")
            return self.model(noise)
        if labels is None:
            labels = torch.arange(n, device=self.device) % self.num_classes
        return self.model(noise, labels.to(self.device))


def load_sampler(cfg: Config, dataset: str, *, checkpoint: str | None, mlflow_run: str | None,
                 device: torch.device, seed: int = 0) -> Sampler:
    """The generator of a DVC output, a checkpoint or an MLflow run, as a ``Sampler``."""
    from pipeline.train import build_generator_and_discriminator

    classes = len(DATASETS[dataset].classes)
    if mlflow_run:
        import mlflow.pytorch

        mlflow.set_tracking_uri(tracking.tracking_uri(cfg, Path.cwd()))
        model = mlflow.pytorch.load_model(f"runs:/{mlflow_run}/generator", device=device)
        # The run's own model size, which may differ from today's params.yaml.
        params = mlflow.get_run(mlflow_run).data.params
        latent_dim = int(params["model.latent_dim"])
        conditional = params.get("model.conditional", "none") != "none"
    else:
        path = Path(checkpoint or Path("models") / dataset / "generator.pt")
        if not path.exists():
            raise FileNotFoundError(f"no generator at {path} (run `dvc repro train@{dataset}` first)")
        state = torch.load(path, map_location=device, weights_only=True)
        model_cfg = ModelConfig(**state["model"]) if "model" in state else cfg.model
        # A training checkpoint samples with G's moving average when the run kept one.
        weights = state["state_dict"] if "state_dict" in state else (state["trainer"].get("g_ema")
                                                                      or state["trainer"]["generator"])
        model, _ = build_generator_and_discriminator(model_cfg, dataset)
        model.load_state_dict(weights)
        model.to(device).eval()
        latent_dim = model_cfg.latent_dim
        conditional = model_cfg.conditional != "none"
    return Sampler(model, latent_dim, classes if conditional else 0, device, seed)


def class_index(dataset: str, label: str) -> int:
    """--label as a class index: a number, or one of the dataset's class names (e.g. Sneaker)."""
    names = DATASETS[dataset].classes
    index = int(label) if label.isdigit() else next((i for i, name in enumerate(names) if name == label), -1)
    if not 0 <= index < len(names):
        raise SampleError(f"--label {label!r} is not a class of {dataset} (allowed: 0-{len(names) - 1} or "
                          f"{', '.join(names)})")
    return index


def sample_command(cfg: Config, dataset: str, *, checkpoint: str | None, mlflow_run: str | None,
                   n: int, output: str, seed: int, label: str | None = None, per_class: int | None = None) -> Path:
    sampler = load_sampler(cfg, dataset, checkpoint=checkpoint, mlflow_run=mlflow_run,
                           device=pick_device(cfg.ray.use_gpu), seed=seed)
    nrow, labels, what = max(1, round(n ** 0.5)), None, f"{n} samples of {dataset}"
    if per_class is not None and per_class < 1:
        raise SampleError(f"--per-class {per_class}: needs at least 1 sample per class")
    if (label is not None or per_class) and not sampler.num_classes:
        option = "--label" if label is not None else "--per-class"
        raise SampleError(f"{option}: this generator is unconditional (model.conditional: none); "
                          "train with model.conditional concat or projection to draw chosen classes")
    if label is not None:
        index = class_index(dataset, label)
        labels, what = torch.full((n,), index), f"{n} samples of {dataset} class {label}"
    elif per_class:
        labels, nrow = class_rows(sampler.num_classes, per_class), per_class
        n, what = len(labels), f"{per_class} samples per class of {dataset}, one row per class"
    save_png(image_grid(sampler(n, labels=labels), nrow=nrow), output)
    print(f"wrote {what} to {output}")
    return Path(output)


def evaluate_command(cfg: Config, dataset: str, *, checkpoint: str | None, mlflow_run: str | None,
                     n: int, seed: int) -> pd.DataFrame:
    if DATASETS[dataset].kind == "toy":
        raise ValueError("ganpipe evaluate measures image datasets; gaussian1d runs report mean/std in training")
    device = pick_device(cfg.ray.use_gpu)
    sampler = load_sampler(cfg, dataset, checkpoint=checkpoint, mlflow_run=mlflow_run, device=device, seed=seed)
    evaluator, reference = load_reference(dataset, Path("."), device)
    scores = evaluate(sampler, evaluator, reference, n=n, device=device, conditional=sampler.num_classes > 0)
    floors = json.loads(evaluator_paths(dataset)["yardstick"].read_text())
    table = pd.DataFrame({"model": scores, "floor (real vs real)": floors["real_vs_real"],
                          "noise ceiling": floors["noise"]}).loc[list(scores)]
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    return table


def model_example(generator: torch.nn.Module, latent_dim: int, n: int = 4) -> dict[str, torch.Tensor]:
    """Named example inputs of a generator as MLflow logs it: {"z"}, or {"z", "label"} for a conditional one."""
    example = {"z": torch.randn(n, latent_dim)}
    if getattr(generator, "num_classes", 0):
        example["label"] = torch.arange(n) % generator.num_classes
    return example
