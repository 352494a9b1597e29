"""Presets: the tutorials' recipes as deltas over params.yaml, each cited, valid and trainable."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from helpers import REPO_ROOT, random_image_batches
from gan.engine import EngineConfig, GANTrainer
from pipeline import cli
from pipeline.config import ConfigError, load_config
from pipeline.presets import available, preset_overrides
from pipeline.modeling import build_generator_and_discriminator

PRESETS = ["dcgan-smooth", "keras-upsample", "mlp-5-50", "pytorch-examples", "vanilla-mlp", "wgan-clip"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, bit-exact comparisons


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
    result = trainer.train_epoch(random_image_batches(20))  # batch 16 instead of the preset's: the rest is the recipe
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


def test_presets_pin_the_knobs_the_default_changed():
    for name in PRESETS:
        overrides = preset_overrides(name, REPO_ROOT)
        assert overrides["train"]["g_ema"] == 0.0 and overrides["model"]["spectral_norm"] is False, name
    assert copy.deepcopy(load_config(REPO_ROOT / "params.yaml")).preset is None
