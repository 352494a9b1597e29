"""Generators and discriminators, built by name from ``MODELS``.

Every generator has ``latent_dim`` and maps z (n, latent_dim) to samples (n, *shape);
image generators end in tanh, so samples lie in [-1, 1] like ``gan.data.to_unit_range``.
Every discriminator returns raw logits of shape (n,): the losses apply the sigmoid
themselves, in numerically safe forms. ``conditional`` wraps them into class-conditional
models (``gan.conditioning``), which also take int64 labels: G(z, y), D(x, y).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from gan.conditioning import CONDITIONAL, Conditioning, build_conditional


class Generator(nn.Module):
    """A network from latent vectors to samples of ``shape``."""

    def __init__(self, net: nn.Module, latent_dim: int, shape: Sequence[int]):
        super().__init__()
        self.net = net
        self.latent_dim = latent_dim
        self.shape = tuple(shape)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        _unconditional(labels)
        return self.net(z).reshape(z.shape[0], *self.shape)  # shape[0], not len(): stays dynamic in torch.export


class Discriminator(nn.Module):
    """A network from samples to one raw logit each."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        _unconditional(labels)
        return self.net(x).reshape(-1)


def _unconditional(labels: torch.Tensor | None) -> None:
    # The engine passes labels=None to every model; a label here is a caller's mistake.
    if labels is not None:
        raise ValueError("this model is unconditional (model.conditional: none): it takes no class labels")


# Hidden-layer activations of the MLP models: leaky_relu (modern default) or the classic tanh / relu.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
}


def _mlp(widths: Sequence[int], dropout: float | None = None, activation: str = "leaky_relu") -> list[nn.Module]:
    """Linear + activation between consecutive widths, each followed by Dropout if one is given.

    Discriminators always get their Dropout layers (p may be 0) so that their
    state_dict keys do not depend on the dropout knob.
    """
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(width_in, width_out), ACTIVATIONS[activation]()]
        if dropout is not None:
            layers.append(nn.Dropout(dropout))
    return layers


def build_mlp(shape, latent_dim, hidden, channels, dropout, activation) -> tuple[Generator, Discriminator]:
    """The vanilla GAN: fully connected G (hidden ascending) and D (hidden descending).

    G ends in tanh: the [-1, 1] form of the tutorials' sigmoid output, since tanh(x) = 2 sigmoid(2x) - 1.
    """
    size = math.prod(shape)
    generator = nn.Sequential(*_mlp([latent_dim, *hidden], activation=activation), nn.Linear(hidden[-1], size),
                              nn.Tanh())
    discriminator = nn.Sequential(
        nn.Flatten(), *_mlp([size, *reversed(hidden)], dropout, activation), nn.Linear(hidden[0], 1)
    )
    return Generator(generator, latent_dim, shape), Discriminator(discriminator)


def build_toy1d(shape, latent_dim, hidden, channels, dropout, activation) -> tuple[Generator, Discriminator]:
    """Small MLPs for the 1-D Gaussian demo. G's output is linear: the data sit near 4, outside tanh's range."""
    size = math.prod(shape)
    generator = nn.Sequential(*_mlp([latent_dim, *hidden], activation=activation), nn.Linear(hidden[-1], size))
    discriminator = nn.Sequential(
        nn.Flatten(), *_mlp([size, *hidden], dropout, activation), nn.Linear(hidden[-1], 1)
    )
    return Generator(generator, latent_dim, shape), Discriminator(discriminator)


def _quarter_size(shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H/4, W/4): the DCGAN generators start at a quarter of the image size and upsample twice."""
    if len(shape) != 3:
        raise ValueError(f"DCGAN models need an image shape (C, H, W), got {tuple(shape)}")
    channels, height, width = shape
    if height % 4 or width % 4:
        raise ValueError(
            f"DCGAN models need H and W divisible by 4 (two 2x upsamplings), got {height}x{width}"
        )
    return channels, height // 4, width // 4


def dcgan_init(module: nn.Module) -> None:
    """The DCGAN paper's init: conv/linear weights ~ N(0, 0.02), BN scale ~ N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_dcgan(shape, latent_dim, hidden, channels, dropout, activation) -> tuple[Generator, Discriminator]:
    """DCGAN: dense -> (4ch, H/4, W/4) -> two stride-2 transposed convs; D mirrors it with strided convs."""
    image_channels, height, width = _quarter_size(shape)
    ch = channels
    generator = nn.Sequential(
        nn.Linear(latent_dim, 4 * ch * height * width, bias=False),
        nn.Unflatten(1, (4 * ch, height, width)),
        nn.BatchNorm2d(4 * ch),
        nn.ReLU(),
        # kernel 4, stride 2, padding 1 doubles H and W exactly
        nn.ConvTranspose2d(4 * ch, 2 * ch, 4, 2, 1, bias=False),
        nn.BatchNorm2d(2 * ch),
        nn.ReLU(),
        nn.ConvTranspose2d(2 * ch, image_channels, 4, 2, 1),
        nn.Tanh(),
    )
    discriminator = nn.Sequential(
        nn.Conv2d(image_channels, ch, 4, 2, 1),  # no BN on the input layer (DCGAN paper)
        nn.LeakyReLU(0.2),
        nn.Dropout(dropout),
        nn.Conv2d(ch, 2 * ch, 4, 2, 1, bias=False),
        nn.BatchNorm2d(2 * ch),
        nn.LeakyReLU(0.2),
        nn.Dropout(dropout),
        nn.Flatten(),
        nn.Linear(2 * ch * height * width, 1),
    )
    generator.apply(dcgan_init)
    discriminator.apply(dcgan_init)
    return Generator(generator, latent_dim, shape), Discriminator(discriminator)


# Keras BatchNormalization(momentum=0.8) keeps 0.8 of the old running statistics;
# PyTorch's momentum is the weight of the NEW batch, so the same rule is momentum=0.2.
# Keras' default epsilon is 1e-3 (PyTorch's 1e-5).
def _keras_batchnorm(num_features: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(num_features, momentum=0.2, eps=1e-3)


def build_dcgan_upsample(shape, latent_dim, hidden, channels, dropout, activation) -> tuple[Generator, Discriminator]:
    """The Keras-tutorial DCGAN: G upsamples (nearest 2x) then convolves; D uses fixed Dropout(0.25).

    The ``dropout`` knob does not apply: the tutorial's D always drops 0.25. Neither
    does ``activation`` (nor in ``build_dcgan``): conv models keep ReLU in G, LeakyReLU in D.
    """
    image_channels, height, width = _quarter_size(shape)
    ch = channels
    generator = nn.Sequential(
        nn.Linear(latent_dim, 2 * ch * height * width),
        nn.ReLU(),
        nn.Unflatten(1, (2 * ch, height, width)),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(2 * ch, 2 * ch, 3, padding=1),
        _keras_batchnorm(2 * ch),
        nn.ReLU(),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(2 * ch, ch, 3, padding=1),
        _keras_batchnorm(ch),
        nn.ReLU(),
        nn.Conv2d(ch, image_channels, 3, padding=1),
        nn.Tanh(),
    )
    widths = [image_channels, max(ch // 2, 1), ch, 2 * ch]
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Conv2d(width_in, width_out, 3, stride=2, padding=1))
        if index > 0:
            layers.append(_keras_batchnorm(width_out))
        layers += [nn.LeakyReLU(0.2), nn.Dropout(0.25)]
    # three stride-2 convs (kernel 3, padding 1) each map n -> ceil(n / 2)
    out_height, out_width = math.ceil(shape[1] / 8), math.ceil(shape[2] / 8)
    discriminator = nn.Sequential(*layers, nn.Flatten(), nn.Linear(2 * ch * out_height * out_width, 1))
    return Generator(generator, latent_dim, shape), Discriminator(discriminator)


MODELS: dict[str, Callable[..., tuple[Generator, Discriminator]]] = {
    "mlp": build_mlp,
    "dcgan": build_dcgan,
    "dcgan_upsample": build_dcgan_upsample,
    "toy1d": build_toy1d,
}


def spectral_normalize(discriminator: nn.Module) -> nn.Module:
    """Every Conv2d and Linear of D divided by its largest singular value (Miyato et al., 2018).

    One power iteration per forward in training mode, so each layer is 1-Lipschitz
    as training goes on; BatchNorm layers are left as they are.
    """
    for module in list(discriminator.modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.Embedding)):  # Embedding: a projection D's classes
            nn.utils.parametrizations.spectral_norm(module)
    return discriminator


def build_models(
    name: str,
    shape: Sequence[int] = (1, 28, 28),
    latent_dim: int = 100,
    hidden: Sequence[int] = (256, 512, 1024),
    channels: int = 64,
    dropout: float = 0.0,
    activation: str = "leaky_relu",
    spectral_norm: bool = False,
    conditional: str = "none",
    num_classes: int = 0,
    label_embedding: int | None = None,
) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) of the named model for samples of ``shape``.

    ``conditional`` other than "none": class-conditional on ``num_classes`` classes (``gan.conditioning``),
    G's label embedding ``label_embedding`` wide (required then: params.yaml's model.label_embedding).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
    if conditional not in CONDITIONAL:
        raise ValueError(f"unknown conditional {conditional!r}; allowed: {', '.join(CONDITIONAL)}")
    arguments = (tuple(shape), latent_dim, tuple(hidden), channels, dropout, activation)
    if conditional == "none":
        generator, discriminator = MODELS[name](*arguments)
    elif label_embedding is None:
        raise ValueError(f"a {conditional} model needs label_embedding (the width of G's label embedding)")
    else:
        generator, discriminator = build_conditional(MODELS[name], conditional, num_classes, *arguments,
                                                     label_embedding=label_embedding)
    if spectral_norm:
        spectral_normalize(discriminator)
    generator.conditioning = discriminator.conditioning = Conditioning(conditional, num_classes)
    return generator, discriminator
