"""GAN objectives on raw discriminator logits, by name in ``LOSSES``.

The sigmoid is never applied explicitly: log D(x) = -softplus(-x) and
log(1 - D(x)) = -softplus(x) stay finite for any logit, where log(sigmoid(x))
underflows to -inf once the discriminator is confident.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def bce_d_loss(real_logits: Tensor, fake_logits: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """-log D(x) - log(1 - D(G(z))), with one-sided label smoothing: the real target is 1 - s."""
    real_targets = torch.full_like(real_logits, 1.0 - label_smoothing)
    return (F.binary_cross_entropy_with_logits(real_logits, real_targets)
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def minimax_g_loss(fake_logits: Tensor) -> Tensor:
    """The original, saturating objective: G minimizes log(1 - D(G(z))) = -softplus(logit)."""
    return -F.softplus(fake_logits).mean()


def non_saturating_g_loss(fake_logits: Tensor) -> Tensor:
    """G maximizes log D(G(z)): BCE of the fakes against the real label."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def wasserstein_d_loss(real_logits: Tensor, fake_logits: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """The critic maximizes E[f(x)] - E[f(G(z))]. Label smoothing has no meaning here and is ignored."""
    return fake_logits.mean() - real_logits.mean()


def wasserstein_g_loss(fake_logits: Tensor) -> Tensor:
    return -fake_logits.mean()


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """max(0, 1 - f(x)) + max(0, 1 + f(G(z))). Label smoothing is ignored."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


@dataclass(frozen=True)
class GANLoss:
    """One objective: ``d_loss(real_logits, fake_logits, label_smoothing)`` and ``g_loss(fake_logits)``."""

    d_loss: Callable[[Tensor, Tensor, float], Tensor]
    g_loss: Callable[[Tensor], Tensor]


LOSSES: dict[str, GANLoss] = {
    "minimax": GANLoss(bce_d_loss, minimax_g_loss),
    "ns": GANLoss(bce_d_loss, non_saturating_g_loss),
    "wgan": GANLoss(wasserstein_d_loss, wasserstein_g_loss),  # with clip_weights after each D step
    "wgan_gp": GANLoss(wasserstein_d_loss, wasserstein_g_loss),  # plus penalty_at
    "hinge": GANLoss(hinge_d_loss, wasserstein_g_loss),
}


def interpolate(real: Tensor, fake: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Points on random straight lines between real and fake samples, ready for a gradient penalty."""
    alpha = torch.rand((len(real),) + (1,) * (real.dim() - 1), generator=generator, device=real.device)
    return (alpha * real + (1 - alpha) * fake).detach().requires_grad_(True)


def penalty_at(points: Tensor, logits: Tensor) -> Tensor:
    """WGAN-GP's (||grad_x D(x)|| - 1)^2 at ``points``, given the critic's ``logits`` there.

    create_graph=True keeps the gradient differentiable, so the penalty trains D
    (a double backward: this is why wgan_gp never runs as a CUDA graph).
    """
    (grads,) = torch.autograd.grad(logits.sum(), points, create_graph=True)
    return (grads.flatten(1).float().norm(dim=1) - 1.0).square().mean()


@torch.no_grad()
def clip_weights(module: nn.Module, clip_value: float) -> None:
    """WGAN's Lipschitz constraint: clamp every parameter of the critic to [-c, c]."""
    for parameter in module.parameters():
        parameter.clamp_(-clip_value, clip_value)
