"""The CUDA-graph path's safety net, on CPU: the capture is swapped for stand-ins that work, raise or lie.

Whatever happens to the graph, training must equal plain eager training bit for bit:
the check's extra eager iteration is rolled back, and so is a failed or wrong graph.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from gan.data import to_unit_range
from gan.engine import GANTrainer
from gan.graph import CapturedIteration
from gan.models import build_models
from helpers import engine_config


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, bit-exact comparisons


def make_trainer() -> GANTrainer:
    torch.manual_seed(0)
    generator, discriminator = build_models("dcgan", (1, 28, 28), latent_dim=16, channels=8)
    return GANTrainer(generator, discriminator, engine_config(log_every=1), device="cpu", seed=0)


def batches(n: int = 8, size: int = 16) -> list[torch.Tensor]:
    pixels = torch.randint(0, 256, (n * size, 1, 28, 28), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    return list(to_unit_range(pixels).split(size))


def with_graph(make_capture) -> tuple[GANTrainer, list[int]]:
    """A CPU trainer forced onto the graph path, its capture replaced; also a list counting replays."""
    trainer = make_trainer()
    trainer.graph = CapturedIteration(trainer)
    replays: list[int] = []
    trainer.graph.capture = make_capture(trainer, replays)
    return trainer, replays


def faithful(trainer, replays):
    def capture(static_reals):
        def replay():
            replays.append(1)
            return trainer.iteration(list(static_reals))
        return replay
    return capture


def raising_at_capture(trainer, replays):
    def capture(static_reals):
        raise RuntimeError("operation not permitted when stream is capturing")
    return capture


def raising_at_replay(trainer, replays):
    def capture(static_reals):
        def replay():
            raise RuntimeError("CUDA error: an illegal instruction was encountered")
        return replay
    return capture


def wrong_maths(trainer, replays):
    """A graph that trains on black images instead of the batch it was given."""
    def capture(static_reals):
        def replay():
            replays.append(1)
            return trainer.iteration([torch.full_like(real, -1.0) for real in static_reals])
        return replay
    return capture


def train(trainer: GANTrainer, epochs: int = 2) -> list[dict]:
    return [row for _ in range(epochs) for row in trainer.train_epoch(batches()).history]


def eager_history() -> list[dict]:
    return train(make_trainer())


def test_a_faithful_graph_is_kept_and_trains_exactly_like_eager_mode():
    trainer, replays = with_graph(faithful)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = train(trainer)
    assert trainer.use_graph and trainer.graph_fallback_reason is None
    # 16 iterations: 3 eager warm-ups, then the checked capture replays once per iteration
    assert len(replays) == 16 - 3
    assert history == eager_history()


@pytest.mark.parametrize("make_capture, reason", [
    (raising_at_capture, "raised RuntimeError: operation not permitted when stream is capturing"),
    (raising_at_replay, "raised RuntimeError: CUDA error: an illegal instruction"),
    (wrong_maths, "differ from eager mode's"),
])
def test_a_broken_graph_warns_once_and_training_goes_on_eagerly(make_capture, reason):
    trainer, replays = with_graph(make_capture)
    with pytest.warns(RuntimeWarning, match="eager mode") as caught:
        history = train(trainer)
    assert len([w for w in caught if "CUDA graph" in str(w.message)]) == 1
    assert reason in str(caught[0].message) and reason in trainer.graph_fallback_reason
    assert not trainer.use_graph
    assert len(replays) <= 1  # the wrong graph replays once, for the check, and never again
    assert history == eager_history()  # the failed attempt left no trace in the training


def test_the_check_compares_losses_within_tolerance():
    graph = CapturedIteration(make_trainer())
    eager = torch.tensor([1.3862, 0.6931])
    assert graph.mismatch(eager, eager * (1 + 5e-4)) is None
    assert "differ" in graph.mismatch(eager, eager * 1.01)
    assert "differ" in graph.mismatch(eager, torch.tensor([float("nan"), 0.6931]))
