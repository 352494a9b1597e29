"""The CUDA-graph path under data parallelism, on CPU: two gloo ranks agree on keeping the graph or dropping it.

As in test_graph_fallback.py the capture is swapped for stand-ins; here each rank
averages its gradients with the engine's own all-reduce (``gan.parallel``), which a
stand-in's replay runs for real. A graph kept on both ranks must train exactly like
eager data parallelism; a capture that fails on one rank must send both to eager
mode (one rank replaying all-reduces that the other never joins would hang), and
training must still equal eager data parallelism.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gan.data import to_unit_range
from gan.engine import GANTrainer
from gan.graph import CapturedIteration
from gan.models import build_models
from gan.parallel import GradientAllReduce
from helpers import engine_config
from test_graph_fallback import faithful, raising_at_capture

WORLD, BROKEN_RANK = 2, 1


def rank_batches(rank: int, n: int = 8, size: int = 16) -> list[torch.Tensor]:
    pixels = torch.randint(0, 256, (n * size, 1, 28, 28), generator=torch.Generator().manual_seed(rank),
                           dtype=torch.uint8)
    return list(to_unit_range(pixels).split(size))


def train_one(rank: int, mode: str) -> dict:
    torch.manual_seed(rank)  # unequal initial weights: the broadcast makes them rank 0's
    generator, discriminator = build_models("dcgan", (1, 28, 28), latent_dim=16, channels=8)
    sync = GradientAllReduce()
    sync.broadcast_state(generator, discriminator)
    trainer = GANTrainer(generator, discriminator, engine_config(log_every=1), device="cpu", seed=rank,
                         gradient_sync=sync)
    if mode != "eager":
        trainer.graph = CapturedIteration(trainer)
        broken = mode == "broken" and rank == BROKEN_RANK
        trainer.graph.capture = (raising_at_capture if broken else faithful)(trainer, [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.train_epoch(rank_batches(rank)).history  # 3 eager warm-ups, capture, 4 replays
    return {"history": history, "use_graph": trainer.use_graph, "reason": trainer.graph_fallback_reason,
            "warnings": [str(w.message) for w in caught if "CUDA graph" in str(w.message)],
            "weights": torch.cat([p.detach().flatten() for p in trainer.d_module.parameters()])}


def rank_main(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)  # bit-exact comparisons need one fixed thread count
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {mode: train_one(rank, mode) for mode in ("eager", "faithful", "broken")}
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out) / f"rank{rank}.pt")


def test_ranks_keep_or_drop_the_graph_together_and_train_like_eager_data_parallelism(tmp_path):
    mp.spawn(rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]

    for results in ranks:
        eager = results["eager"]
        assert not eager["use_graph"] and eager["reason"] is None
        kept = results["faithful"]
        assert kept["use_graph"] and kept["reason"] is None and not kept["warnings"]
        assert kept["history"] == eager["history"]
        dropped = results["broken"]
        assert not dropped["use_graph"] and len(dropped["warnings"]) == 1
        assert dropped["history"] == eager["history"]  # the failed attempt left no trace on any rank
    for mode in ("eager", "faithful", "broken"):  # the all-reduce keeps the replicas identical
        torch.testing.assert_close(ranks[0][mode]["weights"], ranks[1][mode]["weights"], rtol=0, atol=0)
    assert "capture raised RuntimeError: operation not permitted" in ranks[BROKEN_RANK]["broken"]["reason"]
    assert "the CUDA graph failed on rank(s) 1" in ranks[0]["broken"]["reason"]
