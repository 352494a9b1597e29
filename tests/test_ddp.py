"""Data parallelism is exact: 2 Ray workers at batch B/2 == 1 process at batch B on the first D update.

Both ways of averaging gradients over gloo: DDP wrappers, and the engine's own flat
all-reduce (``gan.parallel``, what the pipeline uses, and what its CUDA graph captures).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import engine_config, synthetic_split
from gan.data import shard, to_unit_range
from gan.engine import GANTrainer
from gan.models import build_models
from gan.parallel import GradientAllReduce

pytestmark = pytest.mark.integration

BATCH, LATENT, LR = 32, 8, 0.1
# SGD: the D weights after one step are w - lr * grad, so equal weights mean equal gradients.
CONFIG = engine_config(optimizer="sgd", lr_d=LR, lr_g=LR, d_steps=1, g_steps=1, log_every=1)


class GlobalNoiseTrainer(GANTrainer):
    """Draws one global noise batch and keeps this rank's slice, so every layout sees the same z."""

    rank, world = 0, 1

    def noise(self, n, generator=None):
        if generator is not None:
            return super().noise(n, generator)
        full = torch.randn(n * self.world, self.latent_dim, generator=torch.Generator().manual_seed(self.step))
        return full[self.rank * n:(self.rank + 1) * n]


def real_batch() -> torch.Tensor:
    images, _ = synthetic_split(BATCH, seed=3)
    return to_unit_range(torch.from_numpy(images).unsqueeze(1))


def discriminator_after_one_iteration(generator, discriminator, rank: int, world: int,
                                      gradient_sync=None) -> torch.Tensor:
    trainer = GlobalNoiseTrainer(generator, discriminator, CONFIG, device="cpu", seed=rank,
                                 gradient_sync=gradient_sync)
    trainer.rank, trainer.world = rank, world
    trainer.train_epoch([shard(real_batch(), rank, world)])
    return torch.cat([p.detach().flatten() for p in trainer.d_module.parameters()])


def ddp_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(0)
    generator, discriminator = build_models("mlp", latent_dim=LATENT, hidden=(32, 64))
    generator = ray.train.torch.prepare_model(generator, parallel_strategy_kwargs={"broadcast_buffers": False})
    discriminator = ray.train.torch.prepare_model(discriminator, parallel_strategy_kwargs={"broadcast_buffers": False})
    weights = discriminator_after_one_iteration(generator, discriminator, rank, world)
    torch.save(weights, Path(config["out"]) / f"ddp-rank{rank}.pt")

    torch.manual_seed(rank)  # different weights per rank: the broadcast must make them rank 0's
    generator, discriminator = build_models("mlp", latent_dim=LATENT, hidden=(32, 64))
    sync = GradientAllReduce()
    sync.broadcast_state(generator, discriminator)
    weights = discriminator_after_one_iteration(generator, discriminator, rank, world, gradient_sync=sync)
    torch.save(weights, Path(config["out"]) / f"flat-rank{rank}.pt")


def test_two_workers_at_half_batch_match_one_at_full_batch(tmp_path):
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    torch.manual_seed(0)
    generator, discriminator = build_models("mlp", latent_dim=LATENT, hidden=(32, 64))
    initial = torch.cat([p.detach().flatten().clone() for p in discriminator.parameters()])
    reference = discriminator_after_one_iteration(generator, discriminator, rank=0, world=1)
    assert not torch.allclose(reference, initial)  # the update really moved D

    # Workers import this module (and conftest) by name: put tests/ on their path.
    ray.init(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    try:
        TorchTrainer(ddp_loop, train_loop_config={"out": str(tmp_path)},
                     scaling_config=ray.train.ScalingConfig(num_workers=2),
                     run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"), name="ddp")).fit()
    finally:
        ray.shutdown()
    for way in ("ddp", "flat"):
        rank0, rank1 = (torch.load(tmp_path / f"{way}-rank{r}.pt") for r in (0, 1))
        torch.testing.assert_close(rank0, rank1, rtol=0, atol=0)  # replicas stay identical
        torch.testing.assert_close(rank0, reference, rtol=1e-5, atol=1e-6)
