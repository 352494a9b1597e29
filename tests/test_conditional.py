"""Class-conditional GANs on CPU: models x losses, errors, sweeps, metrics, and whether G follows its labels.

(Labels through batches, the graph path, DDP and resume: tests/test_conditional_path.py.)
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from helpers import (
    CLASSES, IMAGE, SMALL_CONDITIONAL, conditional_models, engine_config, labelled_batches, labelled_data, make_trainer,
    synthetic_split,
)
from gan.conditioning import AuxiliaryClassifierDiscriminator, ConditionalBatchNorm2d, ProjectionDiscriminator
from gan.data import DeviceBatches
from gan.engine import METRICS, GANTrainer
from gan.models import build_models

LOSS_NAMES = ["minimax", "ns", "wgan", "wgan_gp", "hinge"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, bit-exact comparisons


# ---------------------------------------------------------------- models and losses


@pytest.mark.parametrize("conditional", ["concat", "projection"])  # acgan's D predicts the label instead: below
@pytest.mark.parametrize("model", ["mlp", "dcgan", "dcgan_upsample"])
def test_conditional_models_map_latents_and_labels_to_images_and_logits(model, conditional):
    generator, discriminator = conditional_models(model, conditional, spectral_norm=True)
    labels = torch.arange(5)
    images = generator(torch.randn(5, 16), labels)
    assert images.shape == (5, *IMAGE) and images.abs().max() <= 1.0
    assert discriminator(images, labels).shape == (5,)
    assert generator.num_classes == discriminator.num_classes == CLASSES
    # The label reaches both networks: other classes, other images and other logits for the same inputs.
    generator.eval()
    z = torch.randn(1, 16).expand(2, -1)
    with torch.no_grad():
        pair = generator(z, torch.tensor([0, 1]))
        logits = discriminator(pair[:1].expand(2, -1, -1, -1), torch.tensor([2, 7]))
    assert not torch.allclose(pair[0], pair[1])
    assert not torch.isclose(logits[0], logits[1])


def test_projection_uses_conditional_batchnorm_and_spectral_norm_on_its_embedding():
    generator, discriminator = conditional_models("dcgan", "projection", spectral_norm=True)
    assert any(isinstance(m, ConditionalBatchNorm2d) for m in generator.modules())
    assert not any(type(m) is nn.BatchNorm2d and m.affine for m in generator.modules())
    assert isinstance(discriminator, ProjectionDiscriminator)
    assert nn.utils.parametrize.is_parametrized(discriminator.embedding, "weight")
    for _ in range(30):  # power iterations in training mode converge to the largest singular value
        discriminator(torch.randn(4, *IMAGE), torch.arange(4))
    sigma = torch.linalg.matrix_norm(discriminator.embedding.weight.detach(), ord=2)
    assert sigma == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("model", ["mlp", "dcgan", "dcgan_upsample"])
def test_acgan_discriminator_predicts_the_class_instead_of_seeing_it(model):
    generator, discriminator = conditional_models(model, "acgan", spectral_norm=True)
    assert isinstance(discriminator, AuxiliaryClassifierDiscriminator)
    assert nn.utils.parametrize.is_parametrized(discriminator.classifier, "weight")
    discriminator.eval()
    images = generator(torch.randn(5, 16), torch.arange(5)).detach()
    logits, class_logits = discriminator(images, torch.arange(5))
    assert logits.shape == (5,) and class_logits.shape == (5, CLASSES)
    other_logits, other_class_logits = discriminator(images, torch.full((5,), 9))
    assert torch.equal(logits, other_logits) and torch.equal(class_logits, other_class_logits)
    with pytest.raises(ValueError, match="class-conditional: pass the class labels"):
        discriminator(images)
    narrow, _ = conditional_models(model, "acgan", label_embedding=4)
    assert generator.embedding.embedding_dim == 64 and narrow.embedding.embedding_dim == 4
    assert narrow(torch.randn(5, 16), torch.arange(5)).shape == (5, *IMAGE)


def update_and_replay(trainer: GANTrainer, update, real: torch.Tensor, labels: torch.Tensor):
    """``update``'s first metric (its loss), and D's (logits, class logits, fake labels) on the same real and fake
    batch, recomputed by hand with copies of G and D taken before the update."""
    generator, discriminator = copy.deepcopy(trainer.g_module), copy.deepcopy(trainer.d_module)
    state = trainer.noise_generator.get_state()
    loss = update(real, labels)[0]
    trainer.noise_generator.set_state(state)  # the same fakes and fake labels again
    fake_labels = trainer.fake_labels(len(real))
    with torch.no_grad():
        fake = generator(trainer.noise(len(real)), fake_labels)
        logits, class_logits = discriminator(torch.cat([real, fake]), torch.cat([labels, fake_labels]))
    return loss, logits, class_logits, fake_labels


@pytest.mark.parametrize("class_weight", [0.0, 1.0])
def test_acgan_class_head_learns_from_real_labels_and_g_from_the_asked_ones(class_weight):
    """D's class head trains on the real batch's labels only; G's loss gains the cross-entropy of its fakes."""
    trainer = make_trainer("dcgan", "acgan", class_weight=class_weight)
    images, labels = labelled_data(16)
    real = images.float().unsqueeze(1) / 127.5 - 1
    head = trainer.d_module.classifier.weight.detach().clone()
    trainer._d_update(real, labels)
    assert torch.equal(head, trainer.d_module.classifier.weight) == (class_weight == 0)

    loss_g, logits, class_logits, fake_labels = update_and_replay(trainer, trainer._g_update, real, labels)
    adversarial = nn.functional.binary_cross_entropy_with_logits(logits[16:], torch.ones(16))  # ns
    cross_entropy = nn.functional.cross_entropy(class_logits[16:], fake_labels)
    assert cross_entropy > 1.0  # an untrained head: about log(10)
    assert loss_g == pytest.approx(float(adversarial + class_weight * cross_entropy), rel=1e-5)


def test_tacgan_twin_head_learns_the_fakes_classes_and_g_is_paid_for_what_it_cannot_tell():
    """TAC-GAN: D's class logits are the class head's then the twin's; D's twin term is the fakes' asked classes,
    and G's class term is the class head's cross-entropy minus the twin's."""
    bce, ce = nn.functional.binary_cross_entropy_with_logits, nn.functional.cross_entropy
    trainer = make_trainer("dcgan", "tacgan", class_weight=0.5)
    images, labels = labelled_data(16)
    real = images.float().unsqueeze(1) / 127.5 - 1

    loss_d, logits, class_logits, fake_labels = update_and_replay(trainer, trainer._d_update, real, labels)
    assert class_logits.shape == (32, 2 * CLASSES)
    adversarial = bce(logits[:16], torch.ones(16)) + bce(logits[16:], torch.zeros(16))
    class_term = ce(class_logits[:16, :CLASSES], labels) + ce(class_logits[16:, CLASSES:], fake_labels)
    assert loss_d == pytest.approx(float(adversarial + 0.5 * class_term), rel=1e-5)

    loss_g, logits, class_logits, fake_labels = update_and_replay(trainer, trainer._g_update, real, labels)
    class_term = ce(class_logits[16:, :CLASSES], fake_labels) - ce(class_logits[16:, CLASSES:], fake_labels)
    assert loss_g == pytest.approx(float(bce(logits[16:], torch.ones(16)) + 0.5 * class_term), rel=1e-5)
    result = trainer.train_epoch(labelled_batches(64))
    assert all(math.isfinite(v) for v in result.metrics.values())


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("model, conditional", [(model, conditional) for model in ("mlp", "dcgan", "dcgan_upsample")
                                                for conditional in ("concat", "projection", "acgan")])
def test_conditional_models_train_with_every_loss(model, conditional, loss):
    trainer = make_trainer(model, conditional, loss=loss, log_every=2)
    result = trainer.train_epoch(labelled_batches(64))
    assert result.steps == trainer.step == 4
    assert set(result.metrics) == set(METRICS) and all(math.isfinite(v) for v in result.metrics.values())
    assert trainer.sample(labels=torch.tensor([3, 3, 9])).shape == (3, *IMAGE)


def test_wgan_gp_penalty_points_carry_the_real_labels(monkeypatch):
    """The penalty is taken at (x_hat, y) pairs: D sees real, fake and interpolated images with labels."""
    trainer = make_trainer("dcgan", "concat", loss="wgan_gp")
    seen = []
    forward = trainer.discriminator.forward
    monkeypatch.setattr(trainer.discriminator, "forward",
                        lambda x, y: seen.append((len(x), y.clone())) or forward(x, y))
    images, labels = labelled_data(16)
    trainer._d_update(images.float().unsqueeze(1) / 127.5 - 1, labels)
    (n, given), = seen
    assert n == 48 and torch.equal(given[:16], labels) and torch.equal(given[32:], labels)


# ---------------------------------------------------------------- errors


def test_unconditional_model_refuses_labels_and_conditional_one_needs_them():
    generator, discriminator = build_models("dcgan", IMAGE, **SMALL_CONDITIONAL)
    with pytest.raises(ValueError, match="unconditional"):
        generator(torch.randn(2, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="unconditional"):
        discriminator(torch.zeros(2, *IMAGE), torch.tensor([1, 2]))
    conditional_g, _ = conditional_models()
    with pytest.raises(ValueError, match="class-conditional: pass the class labels"):
        conditional_g(torch.randn(2, 16))
    images, _ = labelled_data(32)
    with pytest.raises(ValueError, match="trains on \\(images, labels\\) batches"):
        make_trainer().train_epoch(DeviceBatches(images, 16))
    with pytest.raises(ValueError, match="allowed: none, concat, projection, acgan, tacgan"):
        build_models("dcgan", IMAGE, conditional="cgan", num_classes=10)


@pytest.mark.parametrize("overrides, expected", [
    ({"model.name": "toy1d", "data.datasets": ["gaussian1d"], "model.conditional": "projection"},
     "model.conditional projection needs class labels: toy1d and gaussian1d have none (allowed there: none)"),
    ({"data.datasets": ["mnist", "gaussian1d"], "model.conditional": "concat"},
     "model.conditional concat needs class labels"),
    ({"model.conditional": "cgan"},
     "model.conditional = 'cgan' is invalid: Input should be 'none', 'concat', 'projection', 'acgan' or 'tacgan'"),
    ({"train.class_weight": -1}, "train.class_weight = -1 is invalid"),
    ({"model.label_embedding": 0}, "model.label_embedding = 0 is invalid"),
    ({"model.conditional": "none", "sweep.metric": "cond_accuracy"},
     "sweep.metric cond_accuracy needs a conditional model in every trial"),
    ({"sweep.metric": "cond_accuracy", "sweep.space": {"conditional": ["none", "acgan"]}},
     "sweep.metric cond_accuracy needs a conditional model in every trial"),
    ({"model.name": "toy1d", "data.datasets": ["gaussian1d"]},  # the default is acgan: the toy must say none
     "model.conditional acgan needs class labels: toy1d and gaussian1d have none (allowed there: none)"),
    ({"sweep.space": {"conditional": ["none", "cgan"]}},
     "sweep.space.conditional: 'cgan' is not a valid model.conditional"),
])
def test_bad_conditional_settings_fail_in_one_line_naming_the_key(overrides, expected):
    from helpers import REPO_ROOT
    from pipeline.config import ConfigError, apply_overrides, read_params, validate

    raw = apply_overrides(read_params(REPO_ROOT / "params.yaml"), overrides)
    with pytest.raises(ConfigError) as info:
        validate(raw)
    assert expected in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- sweeps and recipes


def test_conditional_is_a_sweep_dimension_of_the_model_section(tmp_path):
    import numpy as np
    import pandas as pd
    from PIL import Image

    from helpers import REPO_ROOT
    from pipeline.config import apply_overrides, read_params, validate
    from pipeline.search import search_space
    from pipeline.sweep import best_vs_worst, trial_config

    raw = apply_overrides(read_params(REPO_ROOT / "params.yaml"),
                          {"sweep.space": {"conditional": ["none", "projection"], "lr_g": [1e-4]}})
    cfg = validate(raw)
    assert search_space(cfg)["conditional"] == {"grid_search": ["none", "projection"]}
    trial = trial_config(raw, cfg.sweep, {"conditional": "projection", "lr_g": 1e-4})
    assert trial.model.conditional == "projection" and trial.train.lr_g == 1e-4
    with pytest.raises(Exception, match="sweep.metric cond_accuracy needs a conditional model in every trial"):
        validate(apply_overrides(raw, {"sweep.metric": "cond_accuracy"}))
    swept = validate(apply_overrides(raw, {"sweep.metric": "cond_accuracy",
                                           "sweep.space": {"conditional": ["concat", "projection"]}}))
    assert swept.sweep.mode == "max"

    # The best and worst grids side by side, though a conditional grid has more rows.
    for name, rows in (("best", 10), ("worst", 8)):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((2 + 30 * rows, 242), 128, np.uint8)).save(tmp_path / name / "samples.png")
    table = pd.DataFrame({"checkpoint": [str(tmp_path / "best"), str(tmp_path / "worst")],
                          "status": ["completed", "completed"]})
    assert best_vs_worst(table, tmp_path / "grid.png")
    assert np.asarray(Image.open(tmp_path / "grid.png")).shape == (302, 242 * 2 + 8)


def test_the_default_is_acgan_and_the_tutorial_recipes_stay_unconditional():
    import sys

    import yaml

    from helpers import REPO_ROOT
    from pipeline.presets import available

    sys.path[:0] = [str(REPO_ROOT / "benchmarks")]
    from recipes import rows

    plan = rows(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()), [])
    assert plan["default"]["model"]["conditional"] == "acgan"
    assert plan["default"]["model"]["label_embedding"] == 16
    assert {name: plan[name]["model"]["conditional"] for name in plan if "+" in name} == {
        "default+none": "none", "default+concat": "concat", "default+projection": "projection", "default+tacgan": "tacgan",
        "pytorch-examples+concat": "concat"}
    assert plan["pytorch-examples+concat"]["model"]["name"] == "dcgan"
    unconditional = dict(plan["default"], model={**plan["default"]["model"], "conditional": "none"})
    assert plan["default+none"] == unconditional  # the default before acgan, nothing else changed
    tutorials = set(available(REPO_ROOT)) - {"demo"}
    assert len(tutorials) == 6 and all(plan[name]["model"]["conditional"] == "none" for name in tutorials)


# ---------------------------------------------------------------- conditional metrics


def test_conditional_accuracy_and_per_class_fid_tell_a_faithful_sampler_from_a_shifted_one():
    from gan.data import to_unit_range
    from gan.evaluator_net import train_evaluator
    from gan.metrics import evaluate, real_reference

    x_train, y_train = synthetic_split(1000, seed=1)
    x_test, y_test = synthetic_split(500, seed=2)
    evaluator, _ = train_evaluator(x_train, y_train, x_test, y_test, epochs=2, batch_size=50, max_shift=0)
    reference = real_reference(evaluator, x_test, y_test)
    pool, pool_labels = synthetic_split(1000, seed=4)
    by_class = [to_unit_range(torch.from_numpy(pool[pool_labels == k])).unsqueeze(1) for k in range(CLASSES)]

    def sampler(shift: int):
        def sample(n, labels):
            return torch.stack([by_class[(int(k) + shift) % CLASSES][i % 100] for i, k in enumerate(labels)])
        return sample

    faithful = evaluate(sampler(0), evaluator, reference, n=500, batch_size=100, conditional=True)
    shifted = evaluate(sampler(1), evaluator, reference, n=500, batch_size=100, conditional=True)
    assert faithful["cond_accuracy"] >= 0.95 and shifted["cond_accuracy"] <= 0.05
    for scores in (faithful, shifted):
        per_class = [scores[f"cond_accuracy_{k}"] for k in range(CLASSES)]
        assert np.mean(per_class) == pytest.approx(scores["cond_accuracy"])  # 50 samples per class
    for k in range(CLASSES):  # the same images under other labels: far from class k's real images
        assert faithful[f"fid_class_{k}"] * 5 < shifted[f"fid_class_{k}"]
    assert faithful["fid"] == pytest.approx(shifted["fid"], rel=0.05)  # the overall mix is the same
    assert "cond_accuracy" not in evaluate(lambda n: sampler(0)(n, torch.arange(n) % CLASSES), evaluator,
                                           reference, n=200, batch_size=100)


# ---------------------------------------------------------------- does G follow its labels?


def two_class_data(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 uint8 images of two very different classes: 0 is bright on top, 1 bright at the bottom."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, (n,), generator=generator)
    rows = torch.arange(8)[None, :, None]
    bright = torch.where(labels[:, None, None] == 0, rows < 4, rows >= 4)
    images = torch.where(bright, 220, 30) + torch.randint(-20, 21, (n, 8, 8), generator=generator)
    return images.clamp(0, 255).to(torch.uint8), labels


@pytest.mark.parametrize("conditional", ["concat", "projection", "acgan", "tacgan"])
def test_a_short_run_on_two_distinct_classes_makes_g_draw_the_class_it_is_asked_for(conditional):
    # The default model and engine settings (dcgan_upsample, spectral norm, ns loss, Adam at 2e-4), small.
    # Conditional BatchNorm as G's only way in for the label (the first projection G) learned too slowly to
    # follow it: its classes start identical and move by ~lr per update.
    torch.manual_seed(0)
    generator, discriminator = build_models("dcgan_upsample", (1, 8, 8), latent_dim=16, channels=8,
                                            spectral_norm=True, conditional=conditional, num_classes=2,
                                            label_embedding=64)
    trainer = GANTrainer(generator, discriminator, engine_config(log_every=100, g_ema=0.0), device="cpu", seed=0)
    images, labels = two_class_data()
    batches = DeviceBatches(images, 32, seed=0, labels=labels)
    for _ in range(19):  # 16 iterations an epoch: 304 D and G updates
        trainer.train_epoch(batches)
    for label in (0, 1):
        samples = trainer.sample(labels=torch.full((64,), label))[:, 0]
        top, bottom = samples[:, :4].mean((1, 2)), samples[:, 4:].mean((1, 2))
        right = (top > bottom) if label == 0 else (bottom > top)
        assert right.float().mean() >= 0.9, f"class {label}: {right.float().mean():.2f} of its samples look like it"
