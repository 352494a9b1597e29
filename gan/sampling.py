"""Noise, fake labels and sampling of a ``GANTrainer``: what draws from G without training it.

``GANTrainer`` takes these methods from ``Sampling``. Training noise comes from the
trainer's ``noise_generator``; sampling draws from its own ``sample_generator``, so
that evaluating or drawing a grid never shifts the training noise.

A trained generator is saved as a *generator record* (``generator_record``): its
weights with what sampling it needs (model settings, noise kind), so that whoever
samples it later draws as training did, whatever today's params say.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gan.conditioning import label_args, uniform_labels


RECORD_FORMAT = 2  # generator records before it held no noise kind


def draw_noise(n: int, latent_dim: int, kind: str, generator: torch.Generator,
               device: torch.device | str | None = None) -> Tensor:
    """n latent vectors: N(0, 1) for ``kind="gaussian"``, U[-1, 1] for ``kind="uniform"``."""
    shape = (n, latent_dim)
    if kind == "uniform":
        return torch.rand(shape, generator=generator, device=device) * 2 - 1
    return torch.randn(shape, generator=generator, device=device)


class Sampling:
    """noise / fake_labels / sample of a ``GANTrainer``."""

    def noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n latent vectors: N(0, 1), or U[-1, 1] for ``noise="uniform"``."""
        return draw_noise(n, self.latent_dim, self.config.noise, generator or self.noise_generator, self.device)

    def fake_labels(self, n: int, generator: torch.Generator | None = None) -> Tensor | None:
        """n class labels drawn uniformly on the device for a conditional model; None otherwise."""
        if not self.num_classes:
            return None
        return uniform_labels(n, self.num_classes, generator or self.noise_generator, self.device)

    @property
    def sampling_generator(self) -> nn.Module:
        """The G that samples, evaluates and is exported: the moving average when ``g_ema`` is on."""
        return self.g_ema if self.g_ema is not None else self.g_module

    @torch.no_grad()
    def sample(self, n: int | None = None, noise: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """n fresh samples, or G(noise), in eval mode (BatchNorm running statistics); G's mode is restored after.

        A conditional model samples ``labels`` (uniform classes when not given).
        """
        if noise is None:
            noise = self.noise(n if labels is None else len(labels), self.sample_generator)
        if labels is None:
            labels = self.fake_labels(len(noise), self.sample_generator)
        generator = self.sampling_generator
        was_training = generator.training
        generator.eval()
        try:
            return generator(noise.to(self.device), *label_args(None if labels is None else labels.to(self.device)))
        finally:
            generator.train(was_training)

    def sampling_settings(self, model: dict, dataset: str) -> dict:
        """What sampling this trainer's G needs besides its weights (``model``: the settings it was built with)."""
        return {"format": RECORD_FORMAT, "model": model, "noise": self.config.noise, "dataset": dataset}

    def generator_record(self, model: dict, dataset: str) -> dict:
        """The sampling generator's weights with its ``sampling_settings``: a file ``ganpipe sample`` reads."""
        return {**self.sampling_settings(model, dataset), "state_dict": self.sampling_generator.state_dict()}
