"""The models a run trains, as params.yaml's model section describes them, and where they run.

What the stages that build a generator share: training builds it, sampling and
export rebuild it from what a generator file recorded.
"""

from __future__ import annotations

import torch

from gan.conditioning import conditioning_of
from gan.data import DATASETS
from gan.models import build_models
from pipeline.config import ModelConfig


def build_generator_and_discriminator(m: ModelConfig, dataset: str):
    """params.yaml's model section, built for the dataset's sample shape."""
    return build_models(m.name, shape=DATASETS[dataset].shape, latent_dim=m.latent_dim, hidden=tuple(m.hidden),
                        channels=m.channels, dropout=m.dropout, activation=m.activation,
                        spectral_norm=m.spectral_norm, conditional=m.conditional,
                        num_classes=len(DATASETS[dataset].classes), label_embedding=m.label_embedding)


def model_example(generator: torch.nn.Module, latent_dim: int, n: int = 4) -> dict[str, torch.Tensor]:
    """Named example inputs of a generator as MLflow logs it: {"z"}, or {"z", "label"} for a conditional one."""
    example = {"z": torch.randn(n, latent_dim)}
    if conditioning_of(generator).labelled:
        example["label"] = torch.arange(n) % conditioning_of(generator).num_classes
    return example


def pick_device(use_gpu: bool | str = "auto") -> torch.device:
    return torch.device("cuda" if use_gpu is not False and torch.cuda.is_available() else "cpu")
