"""Class-conditional GANs on CPU: labels through batches, sampling, D:G ratios, early stop, resume, the graph
path and a real DDP step."""

from __future__ import annotations

import gc
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from helpers import CLASSES, IMAGE, conditional_models, engine_config, labelled_batches, labelled_data, make_trainer
from gan.data import DeviceBatches, shard
from gan.engine import GANTrainer
from gan.graph import CapturedIteration

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, bit-exact comparisons


def test_device_batches_pair_each_image_with_its_label_and_shuffle_as_without():
    images, labels = labelled_data(64)
    labelled = list(DeviceBatches(images, 16, seed=5, labels=labels))
    plain = list(DeviceBatches(images, 16, seed=5))
    lookup = {tuple(img.flatten().tolist()): int(y) for img, y in zip(images, labels)}
    for (batch, batch_labels), unlabelled in zip(labelled, plain):
        assert torch.equal(batch, unlabelled) and batch_labels.dtype == torch.int64
        decoded = ((batch + 1) * 127.5).round().to(torch.uint8)[:, 0]
        assert [lookup[tuple(img.flatten().tolist())] for img in decoded] == batch_labels.tolist()
    with pytest.raises(ValueError, match=r"labels must be \(64,\)"):
        DeviceBatches(images, 16, labels=labels[:10])
    assert torch.equal(shard(labels, 1, 2), labels[32:])


def test_fake_labels_are_uniform_device_draws_of_the_noise_generator():
    trainer = make_trainer()
    state = trainer.noise_generator.get_state()
    labels = trainer.fake_labels(20_000)
    assert labels.dtype == torch.int64 and labels.device == trainer.device
    shares = torch.bincount(labels, minlength=CLASSES).double() / len(labels)
    assert torch.allclose(shares, torch.full((CLASSES,), 0.1, dtype=torch.float64), atol=0.01)
    trainer.noise_generator.set_state(state)
    assert torch.equal(trainer.fake_labels(20_000), labels)
    assert make_trainer("dcgan", "none").fake_labels(4) is None


def test_fixed_samples_are_one_row_per_class():
    trainer = make_trainer(g_ema=0.9)
    assert trainer.fixed_labels.tolist() == [c for c in range(CLASSES) for _ in range(8)]
    assert trainer.fixed_noise.shape == (80, 16)
    assert trainer.sample(noise=trainer.fixed_noise, labels=trainer.fixed_labels).shape == (80, *IMAGE)


@pytest.mark.parametrize("d_steps, g_steps", [(2, 1), (1, 3)])
def test_d_g_ratio_and_d_pretraining_count_updates_with_labels(d_steps, g_steps):
    trainer = make_trainer("mlp", "concat", d_steps=d_steps, g_steps=g_steps, d_pretrain_steps=2)
    trainer.train_epoch(labelled_batches(128))  # 8 batches: 2 for pre-training, the rest in iterations
    iterations = 6 // d_steps
    assert (trainer.step, trainer.d_updates, trainer.g_updates) == (iterations, 2 + iterations * d_steps,
                                                                    iterations * g_steps)


class IndifferentCritic(nn.Module):
    """Always logit 0 whatever the class: the generator has fooled it perfectly."""

    num_classes = CLASSES

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x, labels):
        return x.flatten(1).sum(1) * 0 + self.weight * 0 + labels * 0


def test_early_stop_with_labels():
    generator, _ = conditional_models("mlp", "concat")
    trainer = GANTrainer(generator, IndifferentCritic(), engine_config(early_stop_patience=2, log_every=1),
                         device="cpu")
    result = trainer.train_epoch(labelled_batches(128))
    assert trainer.stopped_early and result.steps == 2


@pytest.mark.parametrize("conditional", ["projection", "acgan"])
def test_resume_with_labels_and_g_ema_is_bit_exact(tmp_path, conditional):
    images, labels = labelled_data(128)
    config = dict(conditional=conditional, loss="hinge", d_steps=2, log_every=2, g_ema=0.9)

    def batches(seed: int = 3) -> DeviceBatches:
        return DeviceBatches(images, 16, seed=seed, labels=labels)

    straight, data = make_trainer(**config), batches()
    straight.train_epoch(data)
    expected = straight.train_epoch(data).history

    first, data = make_trainer(**config), batches()
    first.train_epoch(data)
    first.save_checkpoint(tmp_path / "ckpt.pt", batches=data)
    resumed, data = make_trainer(seed=9, **config), batches(seed=77)
    resumed.load_checkpoint(tmp_path / "ckpt.pt", batches=data)
    assert resumed.train_epoch(data).history == expected and expected
    for a, b in [(straight.g_module, resumed.g_module), (straight.g_ema, resumed.g_ema)]:
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name
    assert torch.equal(straight.sample(noise=straight.fixed_noise, labels=straight.fixed_labels),
                       resumed.sample(noise=resumed.fixed_noise, labels=resumed.fixed_labels))


@pytest.mark.parametrize("conditional", ["projection", "acgan"])
def test_graph_path_copies_labels_into_a_static_buffer_and_trains_like_eager_mode(conditional):
    """The CPU fallback check: a graph whose replay runs the iteration on its static buffers."""
    eager = make_trainer(conditional=conditional, log_every=1)
    expected = [eager.train_epoch(labelled_batches()).history for _ in range(2)]

    trainer = make_trainer(conditional=conditional, log_every=1)
    trainer.graph = CapturedIteration(trainer)
    replayed_labels = []

    def capture(static_reals, static_labels):
        def replay():
            replayed_labels.append(static_labels.clone())
            return trainer.iteration(list(static_reals), list(static_labels))
        return replay

    trainer.graph.capture = capture
    history = [trainer.train_epoch(labelled_batches()).history for _ in range(2)]
    assert trainer.use_graph and trainer.graph_fallback_reason is None
    assert history == expected
    last_batch = list(labelled_batches())[-1][1]  # same seed, same shuffle: the second epoch's last batch
    assert len(replayed_labels) == 16 - 3  # all but the warm-up iterations
    assert torch.equal(replayed_labels[-1][0], last_batch)


def test_graph_that_raises_falls_back_to_eager_with_labels():
    trainer = make_trainer(log_every=1)
    trainer.graph = CapturedIteration(trainer)

    def capture(static_reals, static_labels):
        raise RuntimeError("operation not permitted when stream is capturing")

    trainer.graph.capture = capture
    with pytest.warns(RuntimeWarning, match="CUDA graph disabled"):
        result = trainer.train_epoch(labelled_batches())
    assert not trainer.use_graph and result.steps == 8


@pytest.mark.parametrize("conditional", ["projection", "acgan"])
def test_one_real_ddp_step_with_labels(tmp_path, conditional):
    """One-process gloo DDP: the conditional D wrapper gets cat([real, fake]) and their labels in one forward."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        generator, discriminator = conditional_models("dcgan", conditional)
        before = [p.detach().clone() for p in discriminator.parameters()]
        trainer = GANTrainer(DDP(generator), DDP(discriminator), engine_config(log_every=1), device="cpu")
        result = trainer.train_epoch(labelled_batches(32))
        assert result.steps == 2 and all(math.isfinite(v) for v in result.metrics.values())
        moved = [not torch.equal(a, b) for a, b in zip(before, trainer.d_module.parameters())]
        assert all(moved)  # the projection embedding or the class head too: every D parameter got its gradient
        del trainer  # the DDP reducers hold the process group: release them before it is destroyed
        gc.collect()
    finally:
        dist.destroy_process_group()
