"""gan.models, gan.losses and gan.images: shapes, registry errors, loss values, grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from gan.losses import LOSSES, clip_weights, interpolate, penalty_at
from gan.images import density_plot, image_grid, save_png
from gan.models import MODELS, build_models

SMALL = dict(latent_dim=16, hidden=(32, 64), channels=8)


def test_registry_names():
    assert set(MODELS) == {"mlp", "dcgan", "dcgan_upsample", "toy1d"}
    assert set(LOSSES) == {"minimax", "ns", "wgan", "wgan_gp", "hinge"}


@pytest.mark.parametrize("name", ["mlp", "dcgan", "dcgan_upsample"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)])
def test_image_models_map_latents_to_images_and_logits(name, shape):
    generator, discriminator = build_models(name, shape, dropout=0.1, **SMALL)
    assert generator.latent_dim == 16
    images = generator(torch.randn(5, 16))
    assert images.shape == (5, *shape)
    assert images.abs().max() <= 1.0  # tanh
    assert discriminator(images).shape == (5,)


def test_toy1d_output_is_linear_not_tanh():
    generator, discriminator = build_models("toy1d", (1,), latent_dim=4, hidden=(16, 16))
    with torch.no_grad():
        generator.net[-1].weight.zero_()
        generator.net[-1].bias.fill_(4.0)  # the data sit near 4: outside tanh's range
        samples = generator(torch.randn(3, 4))
    assert samples.shape == (3, 1)
    assert torch.allclose(samples, torch.full((3, 1), 4.0))
    assert discriminator(samples).shape == (3,)


def test_unknown_model_and_bad_shapes_raise():
    with pytest.raises(ValueError, match="mlp, dcgan, dcgan_upsample, toy1d"):
        build_models("resnet")
    for name in ("dcgan", "dcgan_upsample"):
        with pytest.raises(ValueError, match="divisible by 4"):
            build_models(name, (1, 30, 30), **SMALL)
        with pytest.raises(ValueError, match=r"\(C, H, W\)"):
            build_models(name, (1,), **SMALL)


def test_keras_batchnorm_momentum_is_translated():
    generator, discriminator = build_models("dcgan_upsample", **SMALL)
    norms = [m for m in [*generator.modules(), *discriminator.modules()] if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.momentum == pytest.approx(0.2) for m in norms)
    assert [m.p for m in discriminator.modules() if isinstance(m, nn.Dropout)] == [0.25] * 3


def test_dcgan_init_and_first_layer_without_batchnorm():
    torch.manual_seed(0)
    generator, discriminator = build_models("dcgan", channels=32)
    conv = generator.net[4]
    assert isinstance(conv, nn.ConvTranspose2d)
    assert conv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    first, second = discriminator.net[0], discriminator.net[1]
    assert isinstance(first, nn.Conv2d) and isinstance(second, nn.LeakyReLU)


def hand_bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    p = torch.sigmoid(logits.double())
    return -(target * p.log() + (1 - target) * (1 - p).log()).mean()


def test_label_smoothing_sets_the_real_target_only():
    real, fake = torch.tensor([2.0, -0.5, 1.0]), torch.tensor([-1.0, 0.3])
    for name in ("minimax", "ns"):
        loss = LOSSES[name].d_loss(real, fake, 0.1)
        expected = hand_bce(real, 0.9) + hand_bce(fake, 0.0)  # fakes stay at 0: one-sided
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert LOSSES[name].d_loss(real, fake, 0.0).item() == pytest.approx(
            (hand_bce(real, 1.0) + hand_bce(fake, 0.0)).item(), rel=1e-6)
    # smoothing has no meaning for a critic
    assert LOSSES["wgan"].d_loss(real, fake, 0.1) == LOSSES["wgan"].d_loss(real, fake, 0.0)


def test_generator_losses_and_their_numerical_safety():
    logits = torch.tensor([-200.0, 0.0, 3.0])
    minimax = LOSSES["minimax"].g_loss(logits)
    ns = LOSSES["ns"].g_loss(logits)
    assert torch.isfinite(minimax) and torch.isfinite(ns)  # log(sigmoid(-200)) would be -inf
    p = torch.sigmoid(logits[1:].double())
    assert LOSSES["minimax"].g_loss(logits[1:]).item() == pytest.approx((1 - p).log().mean().item(), rel=1e-6)
    assert LOSSES["ns"].g_loss(logits[1:]).item() == pytest.approx(-p.log().mean().item(), rel=1e-6)
    assert ns.item() == pytest.approx((200 + math.log(2) + math.log1p(math.exp(-3))) / 3, rel=1e-6)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-0.5, -2.0])
    assert LOSSES["wgan"].d_loss(real, fake, 0.0).item() == pytest.approx(-2.5)
    assert LOSSES["hinge"].d_loss(real, fake, 0.0).item() == pytest.approx((0 + 0.5) / 2 + (0.5 + 0) / 2)
    assert LOSSES["hinge"].g_loss(fake).item() == pytest.approx(1.25)


def test_gradient_penalty_of_a_linear_critic():
    critic = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([[3.0, 0.0, 4.0, 0.0]]))  # |grad| = 5 everywhere
    points = interpolate(torch.randn(6, 4), torch.randn(6, 4))  # as the engine does
    penalty = penalty_at(points, critic(points))
    assert penalty.item() == pytest.approx((5 - 1) ** 2)
    penalty.backward()
    assert critic.weight.grad is not None  # the penalty trains the critic


def test_clip_weights_clamps_every_parameter():
    _, critic = build_models("dcgan", **SMALL)
    clip_weights(critic, 0.01)
    assert all(p.abs().max() <= 0.01 for p in critic.parameters())


def test_image_grid_layout_and_values():
    images = torch.full((10, 1, 4, 5), -1.0)
    images[3] = 1.0
    grid = image_grid(images, nrow=4, padding=2)
    assert grid.dtype == np.uint8 and grid.shape == (3 * 6 + 2, 4 * 7 + 2)
    row, col = divmod(3, 4)
    assert (grid[2 + row * 6: 6 + row * 6, 2 + col * 7: 7 + col * 7] == 255).all()
    assert grid[2:6, 2:7].max() == 0
    color = image_grid(torch.zeros(2, 3, 4, 4), nrow=8)
    assert color.shape == (4 + 4, 2 * 6 + 2, 3) and color[3, 3, 0] == 128
    with pytest.raises(ValueError, match="1 or 3 channels"):
        image_grid(torch.zeros(1, 2, 4, 4))


def test_save_png_and_density_plot(tmp_path):
    grid = image_grid(torch.rand(4, 1, 8, 8) * 2 - 1, nrow=2)
    save_png(grid, tmp_path / "out" / "grid.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "grid.png")), grid)
    rng = np.random.default_rng(0)
    xs = np.linspace(2, 6, 50)
    density_plot(rng.normal(4, 0.5, 500), rng.normal(3.8, 0.6, 500), tmp_path / "density.png",
                 decision=(xs, 1 / (1 + np.exp(xs - 4))))
    assert Image.open(tmp_path / "density.png").size[0] > 100

