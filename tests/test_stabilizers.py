"""The default's stabilizers on CPU: G's moving average (g_ema) and spectral normalization in D."""

from __future__ import annotations


import pytest
import torch

from helpers import engine_config, random_image_batches
from gan.engine import GANTrainer
from gan.models import build_models


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, bit-exact comparisons


def ema_trainer(decay: float = 0.9) -> GANTrainer:
    torch.manual_seed(0)
    generator, discriminator = build_models("dcgan", latent_dim=16, channels=8)
    return GANTrainer(generator, discriminator, engine_config(g_ema=decay, g_steps=2), device="cpu")


@pytest.fixture
def g_weights_at_each_update(monkeypatch) -> list[list[torch.Tensor]]:
    """G's weights right after each of its optimizer steps, as the moving average sees them."""
    log: list[list[torch.Tensor]] = []
    original = GANTrainer._update_ema

    def logged(self):
        log.append([p.detach().clone() for p in self.g_module.parameters()])
        original(self)

    monkeypatch.setattr(GANTrainer, "_update_ema", logged)
    return log


def test_g_ema_is_the_hand_computed_average_of_gs_weights(g_weights_at_each_update):
    trainer = ema_trainer(decay=0.9)
    expected = [p.detach().clone() for p in trainer.g_module.parameters()]
    trainer.train_epoch(random_image_batches(4))  # 4 iterations of 2 G updates each
    assert len(g_weights_at_each_update) == 8
    for n, weights in enumerate(g_weights_at_each_update, start=1):
        decay = min(0.9, (1 + n) / (10 + n))  # ramped up, then held at g_ema
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights)]
    for average, want in zip(trainer.g_ema.parameters(), expected):
        torch.testing.assert_close(average, want, rtol=1e-5, atol=1e-7)
    for average, live in zip(trainer.g_ema.buffers(), trainer.g_module.buffers()):
        assert torch.equal(average, live)  # BatchNorm statistics follow G
    assert not torch.equal(next(trainer.g_ema.parameters()), next(trainer.g_module.parameters()))


def test_sampling_and_export_use_the_average():
    trainer = ema_trainer()
    trainer.train_epoch(random_image_batches(3))
    z = torch.randn(5, 16)
    assert trainer.sampling_generator is trainer.g_ema
    torch.testing.assert_close(trainer.sample(noise=z), trainer.g_ema(z))
    trainer.g_module.eval()
    assert not torch.allclose(trainer.sample(noise=z), trainer.g_module(z))
    assert trainer.g_module.train().training  # sampling left G's mode alone


def test_g_ema_resumes_bit_exactly(tmp_path):
    data = random_image_batches(6)
    straight = ema_trainer()
    straight.train_epoch(data)
    first = ema_trainer()
    first.train_epoch(data[:3])
    first.save_checkpoint(tmp_path / "ckpt.pt")
    resumed = ema_trainer()
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    resumed.train_epoch(data[3:])
    for a, b in zip(straight.g_ema.state_dict().values(), resumed.g_ema.state_dict().values()):
        assert torch.equal(a, b)


def test_g_ema_off_samples_with_g_itself():
    torch.manual_seed(0)
    trainer = GANTrainer(*build_models("mlp", hidden=(8,), latent_dim=4), engine_config(g_ema=0.0), device="cpu")
    assert trainer.g_ema is None and trainer.sampling_generator is trainer.g_module
    with pytest.raises(ValueError, match="g_ema must be in"):
        engine_config(g_ema=1.0)


def largest_singular_values(discriminator) -> list[float]:
    return [float(torch.linalg.matrix_norm(m.weight.detach().reshape(m.weight.shape[0], -1), ord=2))
            for m in discriminator.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def scale_weights(discriminator, factor: float) -> None:
    """Multiply every conv/linear weight (the raw one under spectral norm) by ``factor``."""
    with torch.no_grad():
        for m in discriminator.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                raw = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
                raw.mul_(factor)


@pytest.mark.parametrize("model", ["dcgan", "dcgan_upsample", "mlp"])
def test_spectral_norm_keeps_every_layer_of_d_1_lipschitz(model):
    torch.manual_seed(0)
    plain = build_models(model, channels=8, hidden=(32, 64))[1]
    scale_weights(plain, 5.0)
    assert max(largest_singular_values(plain)) > 2  # without it, large weights stay large: the check can fail
    torch.manual_seed(0)
    generator, discriminator = build_models(model, channels=8, hidden=(32, 64), spectral_norm=True)
    scale_weights(discriminator, 5.0)
    trainer = GANTrainer(generator, discriminator, engine_config(lr_d=1e-3), device="cpu")
    trainer.train_epoch(random_image_batches(20))
    discriminator.train()  # the normalized weight of the latest power iteration
    sigmas = largest_singular_values(discriminator)
    # one power iteration per forward trails the moving weights by a few percent
    assert len(sigmas) >= 2 and max(sigmas) <= 1.1, sigmas
