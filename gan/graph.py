"""The whole training iteration as one CUDA graph, proven against eager mode before it is trusted.

Eager steps are launch-bound (a few ms each whatever the batch); replaying one
captured graph per iteration removes that cost. ``CapturedIteration`` owns the
graph of one ``GANTrainer``: the eager warm-up on a side stream, the capture,
the check of its first replay against the same iteration run eagerly, and the
fallback to eager mode for good when anything about it goes wrong.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from gan.checkpoint import cloned


class Replayable(Protocol):
    """What a graph needs of the trainer whose iteration it captures (``gan.engine.GANTrainer`` is one)."""

    config: Any
    device: torch.device
    gradient_sync: Any
    noise_generator: torch.Generator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    loss_names: tuple[str, ...]
    loss_indices: list[int]

    def iteration(self, reals, labels=None) -> Tensor: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def stop_graph(self) -> None: ...


GRAPH_WARMUP_ITERATIONS = 3  # eager iterations on a side stream before capture (CUDA graphs docs)
# How far a graph replay's losses may sit from eager mode's for the same iteration (relative and absolute):
# the same kernels in another launch order; bf16 rounds at about 4e-3.
GRAPH_TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2}


class CapturedIteration:
    """Runs ``trainer.iteration`` as a CUDA graph replay; real batches (and labels) are copied into static buffers.

    The first iterations run eagerly on a side stream (they train for real),
    which creates the optimizer state and picks the kernels before capture.
    A changed learning rate (capturable optimizers bake a float lr into the
    graph) or loaded optimizer state (``reset``) means a fresh capture.
    """

    def __init__(self, trainer: Replayable):
        self.trainer = trainer
        self.replay: Callable[[], Tensor] | None = None
        self.lrs: tuple[float, float] | None = None
        self.static_reals: Tensor | None = None
        self.static_labels: Tensor | None = None  # a conditional model's class labels
        self.warmup_left = GRAPH_WARMUP_ITERATIONS
        self.fallback_reason: str | None = None  # why the graph was given up, if it was

    def reset(self) -> None:
        """Drop the captured graph: the next iteration captures again.

        Also what a data-parallel worker calls before its process group goes: NCCL
        2.26+ hangs in ``destroy_process_group`` while a graph holding its collectives lives.
        """
        self.replay = None  # the replay closure holds the only reference to the CUDAGraph

    def __call__(self, reals: list[Tensor], labels: list[Tensor] | None = None) -> Tensor:
        trainer = self.trainer
        if self.replay is None and self.warmup_left > 0:
            self.warmup_left -= 1
            with self._side_stream():
                return trainer.iteration(reals, labels)
        lrs = (trainer.opt_d.param_groups[0]["lr"], trainer.opt_g.param_groups[0]["lr"])
        if self.replay is not None and (lrs != self.lrs or reals[0].shape != self.static_reals.shape[1:]):
            self.replay = None
        if self.replay is None:
            return self._capture_checked(reals, lrs, labels)
        for buffer, real in zip(self.static_reals, reals):
            buffer.copy_(real)
        if labels is not None:
            for buffer, y in zip(self.static_labels, labels):
                buffer.copy_(y)
        return self.replay()  # overwritten by the next replay: the caller accumulates it first

    def _capture_checked(self, reals: list[Tensor], lrs: tuple[float, float],
                         labels: list[Tensor] | None = None) -> Tensor:
        """Capture the iteration and prove it on its first replay, or fall back to eager mode for good.

        The same iteration runs eagerly first; then the state is rolled back and the
        graph replays it. Their losses must agree within fp32 (or bf16) tolerance. A
        capture or replay that raises, or a graph that computes something else, is
        warned about once; the state is rolled back and training goes on eagerly. Running out of
        memory is raised, not hidden: eager mode would only hide a trial too big for its share.
        With data parallelism every rank takes the same decision (``_agree``): a graph
        holds all-reduces, so one rank replaying while another runs eagerly would hang.
        """
        trainer = self.trainer
        snapshot = cloned(trainer.state_dict())
        expected = trainer.iteration(reals, labels)[trainer.loss_indices]
        # A loaded optimizer adopts the tensors it is given and updates them in place: load a copy.
        trainer.load_state_dict(cloned(snapshot))
        problem = None
        try:
            self.static_reals = torch.stack(reals)
            self.static_labels = None if labels is None else torch.stack(labels)
            buffers = (self.static_reals,) if labels is None else (self.static_reals, self.static_labels)
            self.replay = self.capture(*buffers)
        except torch.OutOfMemoryError:  # torch.cuda.OutOfMemoryError too: the same class
            raise  # not the graph's fault: a trial past its memory share must fail as out of memory
        except Exception as err:  # noqa: BLE001 - whatever breaks the graph, eager mode still trains
            problem = f"capture raised {type(err).__name__}: {err}"
        problem = self._agree(problem)  # replay is collective: only where every rank captured
        if problem is None:
            try:
                metrics = self.replay()
                problem = self.mismatch(expected, metrics[trainer.loss_indices])
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001
                problem = f"first replay raised {type(err).__name__}: {err}"
            problem = self._agree(problem)
        if problem is None:
            self.lrs = lrs
            return metrics
        warnings.warn(f"CUDA graph disabled, training continues in eager mode: {problem}", RuntimeWarning,
                      stacklevel=3)
        self.fallback_reason = problem
        self.replay = None
        trainer.stop_graph()
        trainer.load_state_dict(snapshot)  # also makes the optimizers non-capturable
        return trainer.iteration(reals, labels)

    def _agree(self, problem: str | None) -> str | None:
        """This rank's problem, or, when only other ranks had one, a reason naming them (one collective)."""
        sync = self.trainer.gradient_sync
        if sync is None:
            return problem
        failed = sync.ranks_with(problem is not None, self.trainer.device)
        if problem is None and failed:
            problem = (f"the CUDA graph failed on rank(s) {', '.join(map(str, failed))} (see the warning there); "
                       "every rank trains eagerly, so that their all-reduces still pair up")
        return problem

    def capture(self, static_reals: Tensor, static_labels: Tensor | None = None) -> Callable[[], Tensor]:
        """Capture ``iteration(static_reals, static_labels)`` as a CUDA graph; returns its replay (-> the metrics)."""
        trainer = self.trainer
        trainer.opt_d.zero_grad(set_to_none=True)  # backward allocates .grad from the graph's pool
        trainer.opt_g.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(trainer.noise_generator)  # fresh noise on every replay
        # thread_local: CUDA calls of other threads (e.g. a Ray worker's) do not break the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_metrics = trainer.iteration(static_reals, static_labels)

        def replay() -> Tensor:
            graph.replay()
            return static_metrics

        return replay

    def mismatch(self, eager: Tensor, graph: Tensor) -> str | None:
        """None when the graph's losses match the eager ones, else what differs (one host read-back)."""
        tolerance = GRAPH_TOLERANCE["bf16" if self.trainer.config.bf16 else "fp32"]
        if torch.allclose(graph.float(), eager.float(), rtol=tolerance, atol=tolerance):
            return None
        names = self.trainer.loss_names
        return (f"the captured graph's losses {dict(zip(names, graph.tolist()))} differ from eager mode's "
                f"{dict(zip(names, eager.tolist()))} by more than {tolerance:g}")

    @contextlib.contextmanager
    def _side_stream(self):
        """Eager warm-up before a capture runs on a side stream (CUDA graphs docs); elsewhere a no-op."""
        device = self.trainer.device
        if device.type != "cuda":
            yield
            return
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream(device).wait_stream(stream)
