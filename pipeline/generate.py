"""`ganpipe sample` and `ganpipe evaluate`: use a trained generator.

A generator comes from a DVC output (models/<dataset>/generator.pt), a training
checkpoint (models/<dataset>/checkpoint.pt) or an MLflow run (its logged
``generator`` model). Each records how it samples (model settings, noise kind):
it is drawn as training drew it, whatever params.yaml says today.

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
from gan.sampling import RECORD_FORMAT, draw_noise
from gan.metrics import evaluate
from pipeline import tracking
from pipeline.config import Config, ModelConfig
from pipeline.evaluator import evaluator_paths, load_reference, pick_device


class SampleError(ValueError):
    """A request the generator cannot serve (e.g. a label for an unconditional model); one line."""


class Sampler:
    """``sampler(n)`` -> n generated samples in the data's range, seeded for reproducibility.

    Noise is drawn as the trainer draws it (``gan.sampling.draw_noise``), of the kind the model trained on.
    A conditional generator (``num_classes`` > 0) takes ``labels=`` (int64, one per sample);
    without them it draws the classes in turn. An unconditional one refuses labels.
    """

    def __init__(self, model: Callable[..., torch.Tensor], latent_dim: int, noise: str, num_classes: int,
                 device: torch.device, seed: int = 0):
        self.model, self.latent_dim, self.noise, self.num_classes = model, latent_dim, noise, num_classes
        self.device = device
        self.noise_source = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def __call__(self, n: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        noise = draw_noise(n, self.latent_dim, self.noise, self.noise_source, self.device)
        if not self.num_classes:
            if labels is not None:
                raise SampleError(UNCONDITIONAL)
            return self.model(noise)
        if labels is None:
            labels = torch.arange(n, device=self.device) % self.num_classes
        return self.model(noise, labels.to(self.device))


UNCONDITIONAL = ("this generator is unconditional (model.conditional: none): it cannot draw a chosen class; "
                 "train with model.conditional acgan, concat or projection (docs/conditional.md)")


def read_generator_file(path: Path, dataset: str, device: torch.device) -> tuple[dict, dict]:
    """(sampling settings, weights) of a generator.pt or a training checkpoint.pt, as training recorded them."""
    if not path.exists():
        raise SampleError(f"no generator at {path} (run `dvc repro train@{dataset}` first)")
    state = torch.load(path, map_location=device, weights_only=True)
    if "state_dict" in state:  # generator.pt: the sampling generator itself
        settings, weights = state, state["state_dict"]
    else:  # a training checkpoint: G's moving average when the run kept one
        settings = state.get("sampling", {})
        weights = state["trainer"].get("g_ema") or state["trainer"]["generator"]
    if settings.get("format") != RECORD_FORMAT:
        raise SampleError(f"{path} was written by an older ganpipe and does not record how it samples "
                          "(its noise kind): train it again (`dvc repro train@{dataset}`)")
    return settings, weights


def load_sampler(cfg: Config, dataset: str, *, checkpoint: str | None, mlflow_run: str | None,
                 device: torch.device, seed: int = 0) -> Sampler:
    """The generator of a DVC output, a checkpoint or an MLflow run, as a ``Sampler`` that draws as training did.

    What it samples with (model size, noise kind, conditioning) comes from the file or the run, never from today's
    params.yaml.
    """
    from pipeline.train import build_generator_and_discriminator

    classes = len(DATASETS[dataset].classes)
    if mlflow_run:
        import mlflow.pytorch

        mlflow.set_tracking_uri(tracking.tracking_uri(cfg, Path.cwd()))
        model = mlflow.pytorch.load_model(f"runs:/{mlflow_run}/generator", device=device)
        params = mlflow.get_run(mlflow_run).data.params  # the run's own settings
        latent_dim, noise = int(params["model.latent_dim"]), params["train.noise"]
        conditional = params["model.conditional"] != "none"
    else:
        path = Path(checkpoint or Path("models") / dataset / "generator.pt")
        settings, weights = read_generator_file(path, dataset, device)
        model_cfg = ModelConfig(**settings["model"])
        model, _ = build_generator_and_discriminator(model_cfg, dataset)
        model.load_state_dict(weights)
        model.to(device).eval()
        latent_dim, noise, conditional = model_cfg.latent_dim, settings["noise"], model_cfg.conditional != "none"
    return Sampler(model, latent_dim, noise, classes if conditional else 0, device, seed)


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
        raise SampleError(f"{option}: {UNCONDITIONAL}")
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
