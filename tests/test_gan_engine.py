"""gan.engine on CPU: every model x loss, update counts, resume, NaN guard, and real learning."""

from __future__ import annotations

import dataclasses
import gc
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from helpers import class_patterns, engine_config, shipped_params, synthetic_split
from gan.data import DeviceBatches, sample_gaussian1d, to_unit_range
from gan.engine import METRICS, DivergedError, EngineConfig, GANTrainer
from gan.models import build_models

IMAGE = (1, 28, 28)
SMALL = dict(latent_dim=16, hidden=(32, 64), channels=8)
LOSS_NAMES = ["minimax", "ns", "wgan", "wgan_gp", "hinge"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, bit-exact comparisons


def make_trainer(model: str = "mlp", shape=IMAGE, seed: int = 0, dropout: float = 0.0, **config) -> GANTrainer:
    torch.manual_seed(seed)
    generator, discriminator = build_models(model, shape, dropout=dropout, **SMALL)
    return GANTrainer(generator, discriminator, engine_config(**config), device="cpu", seed=seed)


def image_batches(n_batches: int, batch_size: int = 16, shape=IMAGE, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n_batches * batch_size, *shape), generator=generator, dtype=torch.uint8)
    return list(to_unit_range(pixels).split(batch_size))


def assert_trains(trainer: GANTrainer, batches: list[torch.Tensor], shape) -> None:
    result = trainer.train_epoch(batches)
    assert result.steps == trainer.step == len(batches)
    assert set(result.metrics) == set(METRICS)
    assert all(math.isfinite(v) for v in result.metrics.values()), result.metrics
    assert trainer.sample(3).shape == (3, *shape)


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("model", ["mlp", "dcgan", "dcgan_upsample"])
def test_image_models_train_with_every_loss(model, loss):
    assert_trains(make_trainer(model, loss=loss), image_batches(20), IMAGE)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_toy1d_trains_with_every_loss(loss):
    batches = list(sample_gaussian1d(20 * 32, torch.Generator().manual_seed(0)).split(32))
    assert_trains(make_trainer("toy1d", shape=(1,), loss=loss), batches, (1,))


def test_dcgan_trains_on_color_images():
    shape = (3, 32, 32)
    assert_trains(make_trainer("dcgan", shape=shape, bf16=True), image_batches(20, shape=shape), shape)


def test_wgan_clips_every_critic_weight_and_uses_rmsprop():
    trainer = make_trainer("dcgan", loss="wgan", clip_value=0.01, lr_d=5e-3)
    assert isinstance(trainer.opt_d, torch.optim.RMSprop)  # optimizer "auto" for wgan
    trainer.train_epoch(image_batches(10))
    weights = torch.cat([p.detach().flatten() for p in trainer.d_module.parameters()])
    assert weights.abs().max() <= 0.01
    assert weights.abs().max() == pytest.approx(0.01)  # the clamp was active, not a no-op


@pytest.mark.parametrize("d_steps, g_steps", [(5, 1), (1, 5)])
def test_d_g_ratio_gives_exact_update_counts(d_steps, g_steps):
    trainer = make_trainer(d_steps=d_steps, g_steps=g_steps, d_pretrain_steps=3, log_every=2)
    calls = {"d": 0, "g": 0}
    trainer.opt_d.register_step_post_hook(lambda *_: calls.__setitem__("d", calls["d"] + 1))
    trainer.opt_g.register_step_post_hook(lambda *_: calls.__setitem__("g", calls["g"] + 1))

    result = trainer.train_epoch(image_batches(3 + 4 * d_steps + d_steps - 1))  # a partial group is left over

    iterations = 4
    assert result.steps == trainer.step == iterations
    assert trainer.d_updates == calls["d"] == 3 + iterations * d_steps
    assert trainer.g_updates == calls["g"] == iterations * g_steps
    d_state_steps = {state["step"].item() for state in trainer.opt_d.state.values()}
    g_state_steps = {state["step"].item() for state in trainer.opt_g.state.values()}
    assert d_state_steps == {3 + iterations * d_steps}
    assert g_state_steps == {iterations * g_steps}
    assert [h["step"] for h in result.history] == [2, 4]


def test_an_epoch_shorter_than_log_every_still_logs_its_losses():
    trainer = make_trainer(log_every=50)
    first = trainer.train_epoch(image_batches(3)).history
    second = trainer.train_epoch(image_batches(5, seed=1)).history
    assert [row["step"] for row in first] == [3] and [row["step"] for row in second] == [8]
    assert math.isfinite(first[0]["loss_d"]) and trainer.window_steps == 0


def test_label_smoothing_reaches_the_discriminator_loss():
    batches = image_batches(1)
    losses = {}
    for smoothing in (0.0, 0.2):
        trainer = make_trainer(label_smoothing=smoothing, log_every=1)
        with torch.no_grad():
            real_logits = trainer.d_module(batches[0])  # no BatchNorm or dropout in the mlp: per-sample
        losses[smoothing] = trainer.train_epoch(batches).history[0]["loss_d"]
    # BCE(x, t) = softplus(x) - t * x, so the real target 0.8 instead of 1 adds 0.2 * mean(x)
    assert losses[0.2] - losses[0.0] == pytest.approx(0.2 * real_logits.mean().item(), rel=1e-4, abs=1e-6)


def test_staircase_lr_decay_per_update():
    trainer = make_trainer(lr_d=1e-3, lr_g=1e-3, d_steps=2, lr_decay_gamma=0.5, lr_decay_every=4)
    trainer.train_epoch(image_batches(10))  # 5 iterations: 10 D updates, 5 G updates
    assert trainer.opt_d.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 ** 2)
    assert trainer.opt_g.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 ** 1)


@pytest.mark.parametrize("model, loss", [("mlp", "ns"), ("dcgan", "wgan")])
def test_resume_is_bit_exact(tmp_path, model, loss):
    data = (torch.rand(8 * 16, *IMAGE, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)
    config = dict(loss=loss, d_steps=2, log_every=3, lr_decay_gamma=0.5, lr_decay_every=3)

    straight = make_trainer(model, dropout=0.2, **config)
    batches = DeviceBatches(data, 16, seed=3)
    straight.train_epoch(batches)
    expected_history = straight.train_epoch(batches).history

    first = make_trainer(model, dropout=0.2, **config)
    batches = DeviceBatches(data, 16, seed=3)
    first.train_epoch(batches)
    first.save_checkpoint(tmp_path / "ckpt.pt", batches=batches)

    resumed = make_trainer(model, seed=99, dropout=0.2, **config)  # other weights, noise and RNG
    torch.rand(100)
    batches = DeviceBatches(data, 16, seed=77)
    resumed.load_checkpoint(tmp_path / "ckpt.pt", batches=batches)
    history = resumed.train_epoch(batches).history

    for a, b in [(straight.g_module, resumed.g_module), (straight.d_module, resumed.d_module)]:
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name
    for a, b in [(straight.opt_d, resumed.opt_d), (straight.opt_g, resumed.opt_g)]:
        for state_a, state_b in zip(a.state.values(), b.state.values()):
            assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert (straight.step, straight.d_updates, straight.g_updates) == (resumed.step, resumed.d_updates,
                                                                       resumed.g_updates)
    assert history == expected_history and history
    assert torch.equal(straight.fixed_noise, resumed.fixed_noise)


def test_checkpoint_holds_only_what_weights_only_loads(tmp_path):
    trainer = make_trainer()
    trainer.save_checkpoint(tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert {"generator", "discriminator", "opt_g", "opt_d", "sched_g", "sched_d", "counters", "rng",
            "noise_generator", "fixed_noise"} <= set(state)
    assert state["fixed_noise"].shape == (64, 16)
    with pytest.raises(ValueError, match="no batch iterator state"):
        trainer.load_checkpoint(tmp_path / "ckpt.pt", batches=DeviceBatches(torch.zeros(4, 1), 2))


@pytest.mark.parametrize("poisoned, log_every, raised_at", [(2, 4, 4), (6, 100, 10)])
def test_nan_guard_names_the_step(poisoned, log_every, raised_at):
    batches = image_batches(10)
    batches[poisoned][0, 0, 5, 5] = float("nan")
    trainer = make_trainer(log_every=log_every)
    with pytest.raises(DivergedError, match="lr_d") as caught:
        trainer.train_epoch(batches)
    assert caught.value.step == raised_at
    assert math.isnan(caught.value.last_metrics["loss_d"])


def test_toy1d_learns_the_gaussian():
    torch.manual_seed(0)
    generator, discriminator = build_models("toy1d", (1,), latent_dim=4, hidden=(32, 32))
    trainer = GANTrainer(generator, discriminator, engine_config(lr_g=1e-3, lr_d=1e-3, log_every=500),
                         device="cpu", seed=0)
    assert abs(trainer.sample(2000).mean().item() - 4.0) > 1.0  # far off before training

    data = sample_gaussian1d(1000 * 128, torch.Generator().manual_seed(0))
    trainer.train_epoch(DeviceBatches(data, 128, seed=0))

    samples = trainer.sample(5000)
    assert abs(samples.mean().item() - 4.0) < 0.3
    assert abs(samples.std().item() - 0.5) < 0.25


def pattern_coverage(samples: torch.Tensor) -> tuple[float, int]:
    """(fraction of samples close to one of the 10 patterns, how many patterns those cover)."""
    patterns = to_unit_range(torch.from_numpy(class_patterns())).flatten(1)
    distance = (samples.flatten(1)[:, None, :] - patterns[None]).abs().mean(2)  # mean |pixel difference|
    best, nearest = distance.min(1)
    close = best < 0.25  # two distinct patterns differ by ~0.6 on this scale, blank noise by ~1
    return close.float().mean().item(), len(set(nearest[close].tolist()))


def test_dcgan_learns_several_synthetic_patterns():
    images, _ = synthetic_split(640, seed=0)
    trainer = make_trainer("dcgan", lr_g=2e-4, lr_d=2e-4)
    assert pattern_coverage(trainer.sample(256)) == (0.0, 0)

    batches = DeviceBatches(torch.from_numpy(images), 64, seed=0)
    while trainer.step < 300:
        trainer.train_epoch(batches)

    close_fraction, covered = pattern_coverage(trainer.sample(256))
    assert close_fraction > 0.5
    assert covered >= 3


def test_uniform_noise_lies_in_unit_interval():
    uniform = make_trainer(noise="uniform").noise(4000)
    assert uniform.min() >= -1 and uniform.max() <= 1
    assert uniform.min() < -0.99 and uniform.max() > 0.99
    assert make_trainer(noise="gaussian").noise(4000).abs().max() > 2



@pytest.mark.filterwarnings("ignore:Grad strides do not match")  # wgan_gp's double backward: perf only
@pytest.mark.parametrize("loss", ["ns", "wgan_gp"])
def test_trains_ddp_wrapped_modules(tmp_path, loss):
    """One-process gloo DDP: each wrapper gets one forward per backward, raw modules everywhere else."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        generator, discriminator = build_models("dcgan", dropout=0.1, **SMALL)  # BatchNorm in both
        reduced = []

        def all_reduce_mean(metrics: torch.Tensor) -> torch.Tensor:
            reduced.append(metrics.shape)
            dist.all_reduce(metrics)
            return metrics / dist.get_world_size()

        trainer = GANTrainer(DDP(generator), DDP(discriminator), engine_config(loss=loss, d_steps=2, log_every=2),
                             device="cpu", metric_reducer=all_reduce_mean)
        result = trainer.train_epoch(image_batches(8))
        assert result.steps == 4 and all(math.isfinite(v) for v in result.metrics.values())
        assert reduced == [(len(METRICS),)] * 3  # two windows and the epoch means
        assert not any(key.startswith("module.") for key in trainer.state_dict()["generator"])
        # The DDP reducers hold the process group: freed after destroy_process_group(), gloo's destructor can
        # wait forever on its worker threads. Free them first.
        del trainer, generator, discriminator
        gc.collect()
    finally:
        dist.destroy_process_group()

class IndifferentCritic(nn.Module):
    """Always logit 0, D = 0.5: the generator has fooled it perfectly."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x.flatten(1).sum(1) * 0 + self.weight * 0


@pytest.mark.parametrize("patience, steps", [(3, 6), (0, 20)])
def test_early_stop_when_d_of_g_stays_at_one_half(patience, steps):
    generator, _ = build_models("mlp", **SMALL)
    config = engine_config(early_stop_patience=patience, early_stop_tol=0.05, log_every=2)
    trainer = GANTrainer(generator, IndifferentCritic(), config, device="cpu")
    result = trainer.train_epoch(image_batches(20))
    assert result.steps == trainer.step == steps
    assert trainer.stopped_early == (patience > 0)


def test_sample_runs_in_eval_mode_and_restores_train_mode():
    trainer = make_trainer("dcgan", g_ema=0.0)  # sampling G itself, not its moving average
    trainer.train_epoch(image_batches(3))
    samples = trainer.sample(noise=trainer.fixed_noise)
    assert trainer.g_module.training
    trainer.g_module.eval()
    with torch.no_grad():
        assert torch.equal(samples, trainer.g_module(trainer.fixed_noise))


def test_engine_config_holds_no_defaults_and_reads_the_train_section():
    """Every engine knob is a train key of params.yaml and has no default of its own (params.yaml owns them)."""
    train = shipped_params()["train"]
    assert all(field.default is dataclasses.MISSING for field in dataclasses.fields(EngineConfig))
    config = EngineConfig.from_mapping(train)  # skips epochs, batch_size, seed, ...
    for field in dataclasses.fields(EngineConfig):
        expected = tuple(train[field.name]) if isinstance(train[field.name], list) else train[field.name]
        assert getattr(config, field.name) == expected, field.name
    with pytest.raises(TypeError, match="g_ema"):
        EngineConfig.from_mapping({key: value for key, value in train.items() if key != "g_ema"})
    with pytest.raises(ValueError, match="loss 'wasserstein'"):
        engine_config(loss="wasserstein")


def test_loaded_checkpoint_keeps_the_configured_learning_rates(tmp_path):
    """Population-based sweeps restore another trial's state under new learning rates."""
    batches = [to_unit_range(torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)) for _ in range(6)]
    source = make_trainer(lr_decay_gamma=0.5, lr_decay_every=2)
    source.train_epoch(batches)  # 6 updates each: decayed three times
    source.save_checkpoint(tmp_path / "state.pt")

    explored = make_trainer(lr_g=1e-3, lr_d=4e-3, lr_decay_gamma=0.5, lr_decay_every=2)
    explored.load_checkpoint(tmp_path / "state.pt")
    assert explored.opt_g.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 ** 3)
    assert explored.opt_d.param_groups[0]["lr"] == pytest.approx(4e-3 * 0.5 ** 3)
    explored.train_epoch(batches[:2])  # the schedule goes on from the new base
    assert explored.opt_d.param_groups[0]["lr"] == pytest.approx(4e-3 * 0.5 ** 4)
