"""params.yaml validation: every bad value stops with one line naming key, value and what is allowed."""

from __future__ import annotations

import typing

import pytest
import yaml

from helpers import REPO_ROOT
from pipeline.config import (
    ConfigError, DatasetName, LossName, ModelName, apply_overrides, flatten, load_config, read_params, validate,
)


def error_for(overrides: dict) -> str:
    raw = apply_overrides(read_params(REPO_ROOT / "params.yaml"), overrides)
    with pytest.raises(ConfigError) as info:
        validate(raw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_project_params_are_valid():
    cfg = load_config(REPO_ROOT / "params.yaml")
    assert cfg.data.datasets == ["mnist", "fashion_mnist"]
    assert cfg.model.name == "dcgan_upsample" and cfg.model.spectral_norm and cfg.train.loss == "ns"
    assert cfg.train.g_ema == 0.999 and cfg.train.batch_size == 32 and cfg.preset is None
    assert cfg.train.betas_g == (0.5, 0.999)
    assert flatten(cfg)["train.lr_g"] == pytest.approx(2e-4)


@pytest.mark.parametrize("key, value, expected", [
    ("data.datasets", ["mnist", "cifar"],
     "data.datasets.1 = 'cifar' is invalid: Input should be 'mnist', 'fashion_mnist' or 'gaussian1d'"),
    ("model.name", "resnet",
     "model.name = 'resnet' is invalid: Input should be 'mlp', 'dcgan', 'dcgan_upsample' or 'toy1d'"),
    ("train.lr_g", -1e-3, "train.lr_g = -0.001 is invalid: Input should be greater than 0"),
    ("mlflow.flush_timeout_s", -1, "mlflow.flush_timeout_s = -1 is invalid: Input should be greater than or equal to 0"),
    ("train.d_steps", 0, "train.d_steps = 0 is invalid: Input should be greater than 0"),
    ("train.loss", "wgan-gp", "train.loss = 'wgan-gp' is invalid: Input should be 'minimax', 'ns'"),
    ("train.betas_d", [0.5, 1.5], "train.betas_d = [0.5, 1.5] is invalid: both betas must be in [0, 1)"),
    ("train.label_smoothing", 1.0, "train.label_smoothing = 1.0 is invalid: Input should be less than 1"),
    ("ray.use_gpu", "maybe", "ray.use_gpu = 'maybe' is invalid: Input should be 'auto', True or False"),
    ("train.epochs", "ten", "train.epochs = 'ten' is invalid: Input should be a valid integer"),
])
def test_bad_values_name_key_value_and_allowed(key, value, expected):
    assert expected in error_for({key: value})


def test_mistyped_key_is_an_error_listing_allowed_keys():
    message = error_for({"train.lr_gen": 1e-3})
    assert message.startswith("params.yaml: unknown key 'train.lr_gen' (allowed here: epochs, batch_size")
    assert "lr_g" in message
    assert "unknown key 'trian'" in error_for({"trian": {}})


def test_duplicate_dataset_and_toy_model_mismatch():
    assert "each dataset may appear once" in error_for({"data.datasets": ["mnist", "mnist"]})
    assert "toy1d only trains the gaussian1d dataset" in error_for({"model.name": "toy1d"})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "params.yaml")


def test_config_names_match_the_gan_registries():
    from gan.conditioning import CONDITIONAL
    from gan.data import DATASETS
    from gan.losses import LOSSES
    from gan.models import MODELS
    from pipeline.config import ModelConfig

    assert set(typing.get_args(DatasetName)) == set(DATASETS)
    assert set(typing.get_args(ModelName)) == set(MODELS)
    assert set(typing.get_args(LossName)) == set(LOSSES)
    assert set(typing.get_args(ModelConfig.model_fields["conditional"].annotation)) == set(CONDITIONAL)


def test_cli_reports_config_error_in_one_line(tmp_path, capsys):
    from pipeline.cli import main

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["train"]["d_steps"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["--params", str(tmp_path / "params.yaml"), "fetch", "--dataset", "mnist"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "ganpipe fetch: error:" in err and "train.d_steps = 0 is invalid" in err


def _leaf_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        # A section's or the mirrors' own keys (datasets): each one a key of its own.
        if isinstance(value, dict) and dotted not in ("sweep.space",):
            keys += _leaf_keys(value, f"{dotted}.")
    return keys


def _without(raw: dict, dotted: str) -> dict:
    out = yaml.safe_load(yaml.safe_dump(raw))
    *parents, leaf = dotted.split(".")
    node = out
    for part in parents:
        node = node[part]
    del node[leaf]
    return out


SHIPPED = read_params(REPO_ROOT / "params.yaml")


@pytest.mark.parametrize("key", _leaf_keys(SHIPPED))
def test_dropping_any_shipped_key_is_refused_naming_it_or_changes_nothing(key):
    """params.yaml owns every default: a file that leaves a key out never trains something else silently."""
    with pytest.raises(ConfigError) as info:
        validate(_without(SHIPPED, key))
    message = str(info.value)
    assert "\n" not in message and f"missing key '{key}'" in message, message
