"""`ganpipe sample` and `ganpipe evaluate`: use a trained generator.

A generator comes from a DVC output (models/<dataset>/generator.pt), a training
checkpoint (models/<dataset>/checkpoint.pt, built with params.yaml's model
section), or an MLflow run (its logged ``generator`` model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from gan.data import DATASETS
from gan.images import image_grid, save_png
from gan.metrics import evaluate
from pipeline import tracking
from pipeline.config import Config, ModelConfig
from pipeline.evaluator import evaluator_paths, load_reference, pick_device

Sampler = Callable[[int], torch.Tensor]


def load_sampler(cfg: Config, dataset: str, *, checkpoint: str | None, mlflow_run: str | None,
                 device: torch.device, seed: int = 0) -> Sampler:
    """A function n -> n generated samples in the data's range, seeded for reproducibility."""
    from pipeline.train import build_generator_and_discriminator

    noise_source = torch.Generator(device=device).manual_seed(seed)
    if mlflow_run:
        import mlflow.pytorch

        mlflow.set_tracking_uri(tracking.tracking_uri(cfg, Path.cwd()))
        model = mlflow.pytorch.load_model(f"runs:/{mlflow_run}/generator", device=device)
        # The run's own model size, which may differ from today's params.yaml.
        latent_dim = int(mlflow.get_run(mlflow_run).data.params["model.latent_dim"])
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

    @torch.no_grad()
    def sample(n: int) -> torch.Tensor:
        noise = torch.randn(n, latent_dim, generator=noise_source, device=device)
        return model(noise)

    return sample


def sample_command(cfg: Config, dataset: str, *, checkpoint: str | None, mlflow_run: str | None,
                   n: int, output: str, seed: int) -> Path:
    sampler = load_sampler(cfg, dataset, checkpoint=checkpoint, mlflow_run=mlflow_run,
                           device=pick_device(cfg.ray.use_gpu), seed=seed)
    nrow = max(1, round(n ** 0.5))
    save_png(image_grid(sampler(n), nrow=nrow), output)
    print(f"wrote {n} samples of {dataset} to {output}")
    return Path(output)


def evaluate_command(cfg: Config, dataset: str, *, checkpoint: str | None, mlflow_run: str | None,
                     n: int, seed: int) -> pd.DataFrame:
    if DATASETS[dataset].kind == "toy":
        raise ValueError("ganpipe evaluate measures image datasets; gaussian1d runs report mean/std in training")
    device = pick_device(cfg.ray.use_gpu)
    sampler = load_sampler(cfg, dataset, checkpoint=checkpoint, mlflow_run=mlflow_run, device=device, seed=seed)
    evaluator, reference = load_reference(dataset, Path("."), device)
    scores = evaluate(sampler, evaluator, reference, n=n, device=device)
    floors = json.loads(evaluator_paths(dataset)["yardstick"].read_text())
    table = pd.DataFrame({"model": scores, "floor (real vs real)": floors["real_vs_real"],
                          "noise ceiling": floors["noise"]}).loc[list(scores)]
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    return table
