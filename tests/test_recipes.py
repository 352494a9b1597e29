"""The recipe knobs on CPU: presets, G's moving average (g_ema) and spectral normalization in D."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from conftest import REPO_ROOT
from gan.data import to_unit_range
from gan.engine import EngineConfig, GANTrainer
from gan.models import build_models
from pipeline import cli
from pipeline.config import ConfigError, load_config
from pipeline.presets import available, preset_overrides
from pipeline.train import build_generator_and_discriminator
from helpers import engine_config

PRESETS = ["dcgan-smooth", "keras-upsample", "mlp-5-50", "pytorch-examples", "vanilla-mlp", "wgan-clip"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, bit-exact comparisons


def batches(n: int, size: int = 16, seed: int = 0) -> list[torch.Tensor]:
    pixels = torch.randint(0, 256, (n * size, 1, 28, 28), generator=torch.Generator().manual_seed(seed),
                           dtype=torch.uint8)
    return list(to_unit_range(pixels).split(size))


# ---------------------------------------------------------------- presets

def test_every_tutorial_recipe_is_a_preset_that_cites_its_source():
    assert [name for name in available(REPO_ROOT) if name != "demo"] == PRESETS  # demo: make demo's, no tutorial
    for name in PRESETS:
        text = (REPO_ROOT / "presets" / f"{name}.yaml").read_text()
        assert text.startswith("# "), f"{name}.yaml must open with the tutorial it reproduces"


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_validates_and_trains_20_steps(name):
    cfg = load_config(REPO_ROOT / "params.yaml", {"preset": name})
    for section, values in preset_overrides(name, REPO_ROOT).items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == (tuple(value) if isinstance(value, list)
                                                          and key.startswith("betas") else value), (section, key)
    torch.manual_seed(0)
    generator, discriminator = build_generator_and_discriminator(cfg.model, "mnist")
    config = EngineConfig.from_mapping(cfg.train.model_dump())
    trainer = GANTrainer(generator, discriminator, config, device="cpu")
    result = trainer.train_epoch(batches(20))  # batch 16 instead of the preset's: the rest is the recipe
    assert trainer.d_updates == 20 // config.d_steps * config.d_steps
    assert trainer.g_updates == 20 // config.d_steps * config.g_steps
    assert all(torch.isfinite(torch.tensor(list(result.metrics.values())))), result.metrics
    assert trainer.sample(4).shape == (4, 1, 28, 28)


def test_the_vanilla_recipe_builds_the_tutorials_network():
    cfg = load_config(REPO_ROOT / "params.yaml", {"preset": "vanilla-mlp"})
    generator, discriminator = build_generator_and_discriminator(cfg.model, "mnist")
    layers = [type(m).__name__ for m in generator.net]
    assert layers == ["Linear", "Tanh", "Linear", "Tanh"]  # z 200 -> 600 tanh -> 784 in [-1, 1]
    assert (generator.net[0].in_features, generator.net[0].out_features, generator.net[2].out_features) == (200, 600,
                                                                                                         784)
    assert cfg.train.noise == "uniform" and cfg.train.loss == "minimax"


def test_a_preset_overrides_params_and_keeps_the_rest(tmp_path):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["preset"] = "wgan-clip"
    params["train"]["epochs"] = 7
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "presets").symlink_to(REPO_ROOT / "presets")
    cfg = load_config(tmp_path / "params.yaml")
    assert (cfg.train.loss, cfg.train.optimizer, cfg.train.d_steps, cfg.train.lr_d) == ("wgan", "rmsprop", 5, 5e-5)
    assert cfg.train.epochs == 7 and cfg.preset == "wgan-clip"


def test_an_unknown_preset_is_one_line_naming_the_choices(capsys):
    with pytest.raises(ConfigError, match=r"preset = 'dcgan-fancy' is not one of: dcgan-smooth, demo, keras-upsample"):
        load_config(REPO_ROOT / "params.yaml", {"preset": "dcgan-fancy"})
    code = cli.main(["--params", str(REPO_ROOT / "params.yaml"), "train", "--dataset", "mnist",
                     "--preset", "dcgan-fancy"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "preset = 'dcgan-fancy'" in err


# ---------------------------------------------------------------- G-EMA

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
    trainer.train_epoch(batches(4))  # 4 iterations of 2 G updates each
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
    trainer.train_epoch(batches(3))
    z = torch.randn(5, 16)
    assert trainer.sampling_generator is trainer.g_ema
    torch.testing.assert_close(trainer.sample(noise=z), trainer.g_ema(z))
    trainer.g_module.eval()
    assert not torch.allclose(trainer.sample(noise=z), trainer.g_module(z))
    assert trainer.g_module.train().training  # sampling left G's mode alone


def test_g_ema_resumes_bit_exactly(tmp_path):
    data = batches(6)
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


# ---------------------------------------------------------------- spectral norm

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
    trainer.train_epoch(batches(20))
    discriminator.train()  # the normalized weight of the latest power iteration
    sigmas = largest_singular_values(discriminator)
    # one power iteration per forward trails the moving weights by a few percent
    assert len(sigmas) >= 2 and max(sigmas) <= 1.1, sigmas


def test_presets_pin_the_knobs_the_default_changed():
    for name in PRESETS:
        overrides = preset_overrides(name, REPO_ROOT)
        assert overrides["train"]["g_ema"] == 0.0 and overrides["model"]["spectral_norm"] is False, name
    assert copy.deepcopy(load_config(REPO_ROOT / "params.yaml")).preset is None


# ---------------------------------------------------------------- benchmarks/recipes.py's table

def test_the_recipes_table_shows_recall_within_class_for_conditional_rows_only(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    from recipes import table

    scores = {"epoch": 1, "fid": 6.5, "kid": 0.09, "inception_score": 8.8, "class_coverage": 1.0, "class_kl": 0.005,
              "precision": 0.62, "recall": 0.35}
    results = {"default": {"scores": [{**scores, "recall_within_class": 0.34, "cond_accuracy": 0.96}],
                           "train_seconds": 10.0, "img_per_s": 100.0},
               "default+none": {"scores": [{**scores, "fid": 9.0}], "train_seconds": 10.0, "img_per_s": 100.0}}
    header, _, conditional, unconditional = table(results, SimpleNamespace(floor={"fid": 0.15}), 1).splitlines()
    cells = dict(zip(header.split(" | "), conditional.split(" | ")))
    assert (cells["precision"], cells["recall"], cells["recall in class"], cells["cond acc"]) == ("0.62", "0.35",
                                                                                               "0.34", "0.960")
    assert dict(zip(header.split(" | "), unconditional.split(" | ")))["recall in class"] == "-"
