"""One sampling path: `ganpipe sample` draws a trained generator as its trainer did, whatever params.yaml says now."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from helpers import REPO_ROOT, run_cmd
from gan.conditioning import class_rows
from gan.data import DeviceBatches
from gan.engine import EngineConfig, GANTrainer
from gan.sampling import draw_noise
from pipeline.config import load_config
from pipeline.generate import SampleError, load_sampler
from pipeline.modeling import build_generator_and_discriminator

PARAMS = REPO_ROOT / "params.yaml"
TRAINED = {"model.name": "mlp", "model.hidden": [32], "model.latent_dim": 8, "model.label_embedding": 4,
           "model.spectral_norm": False, "train.noise": "uniform"}
# What params.yaml says after training: another noise kind, another model size, unconditional.
CHANGED = {"train.noise": "gaussian", "model.latent_dim": 100, "model.conditional": "none"}


@pytest.fixture
def trained(tmp_path, one_thread) -> tuple[GANTrainer, Path]:
    """A conditional MLP trained a few steps on uniform noise (G-EMA on), saved as training saves it."""
    cfg = load_config(PARAMS, TRAINED)
    torch.manual_seed(0)
    trainer = GANTrainer(*build_generator_and_discriminator(cfg.model, "mnist"),
                         EngineConfig.from_mapping(cfg.train.model_dump()), device="cpu")
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    trainer.train_epoch(DeviceBatches(images, 16, labels=torch.arange(64) % 10))
    settings = trainer.sampling_settings(cfg.model.model_dump(), "mnist")
    torch.save(trainer.generator_record(cfg.model.model_dump(), "mnist"), tmp_path / "generator.pt")
    torch.save({"trainer": trainer.state_dict(), "sampling": settings}, tmp_path / "checkpoint.pt")
    return trainer, tmp_path


@pytest.mark.parametrize("file", ["generator.pt", "checkpoint.pt"])
def test_sample_draws_as_the_trainer_did_after_params_changed(trained, file):
    trainer, folder = trained
    labels = class_rows(10, 3)
    expected = trainer.sample(noise=draw_noise(len(labels), 8, "uniform", torch.Generator().manual_seed(5)),
                              labels=labels)
    sampler = load_sampler(load_config(PARAMS, {**TRAINED, **CHANGED}), "mnist", checkpoint=str(folder / file),
                           mlflow_run=None, device=torch.device("cpu"), seed=5)
    assert (sampler.noise, sampler.latent_dim, sampler.num_classes) == ("uniform", 8, 10)
    assert torch.equal(sampler(len(labels), labels=labels), expected)


def test_a_generator_file_of_an_older_format_is_one_line(trained):
    trainer, folder = trained
    old = torch.load(folder / "generator.pt", weights_only=True)
    for key in ("format", "noise"):
        old.pop(key)
    torch.save(old, folder / "old.pt")
    with pytest.raises(SampleError, match="older ganpipe .* noise kind"):
        load_sampler(load_config(PARAMS), "mnist", checkpoint=str(folder / "old.pt"), mlflow_run=None,
                     device=torch.device("cpu"))
    (folder / "params.yaml").write_text(yaml.safe_dump(yaml.safe_load(PARAMS.read_text())))
    result = run_cmd(["ganpipe", "sample", "--dataset", "mnist", "--checkpoint", "old.pt", "-o", "x.png"], folder,
                     check=False)
    assert result.returncode == 1 and not (folder / "x.png").exists()
    assert len(result.stderr.strip().splitlines()) == 1 and "older ganpipe" in result.stderr, result.stderr
