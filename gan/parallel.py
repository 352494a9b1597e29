"""Data parallelism for the engine: one flat gradient all-reduce per update, inside the (captured) iteration.

Why not DistributedDataParallel. The whole iteration (D and G updates) runs as
one CUDA graph, so the gradient exchange must be capturable too. DDP can be
captured, but only when built on a side stream, after 11+ eager iterations (its
buckets are rebuilt after the first one, which must not happen in a capture),
with its reducer's hooks firing bucket by bucket during backward. Averaging the
gradients ourselves is one ``all_reduce`` on one contiguous buffer per update,
after ``backward`` and before the optimizer step: the same code eagerly (gloo on
CPU, NCCL on GPUs) and inside a graph (NCCL 2.9.6+ records collectives), as in
PyTorch's ``test_allreduce_in_cudagraph`` and Megatron-LM's contiguous grad
buffer. Nothing to warm up beyond the graph's own warm-up, no hooks, and one
launch per update (eager steps are launch-bound). What DDP adds, overlapping the
exchange with backward, is worth little for models of a few million weights.

Traps this module and ``gan.graph`` avoid:
- SUM, then divide: NCCL's AVG corrupted data on a single rank until 2.29.7.
- The NCCL communicator is created lazily (Ray Train calls ``init_process_group``
  without ``device_id``): ``broadcast_state`` is an eager collective that creates it
  before any capture, which would otherwise fail.
- Capture and replay are collective: ``ranks_with`` lets every rank take the same
  decision to keep the graph or fall back to eager mode.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import Tensor, nn


class GradientAllReduce:
    """Averages gradients over the ranks of ``group`` with one collective per call.

    Call it with a list of parameters after ``backward``: their gradients are
    copied into one flat buffer, summed across ranks, divided by the world size
    and copied back. A parameter without a gradient contributes zeros (and gets
    the average), so every rank sends a buffer of the same layout.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def __call__(self, params: list[Tensor]) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat.div_(self.world)
        for param, grad, chunk in zip(params, grads, flat.split([grad.numel() for grad in grads])):
            if param.grad is None:
                param.grad = chunk.view_as(param)
            else:
                grad.copy_(chunk.view_as(grad))

    @classmethod
    def broadcasting(cls, *modules: nn.Module, group: dist.ProcessGroup | None = None) -> "GradientAllReduce":
        """The all-reduce of ``group``, after giving every rank rank 0's ``modules`` (``broadcast_state``)."""
        sync = cls(group)
        sync.broadcast_state(*modules)
        return sync

    def broadcast_state(self, *modules: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank, as DDP does when it wraps a module.

        Eager, and before any capture: it also creates the NCCL communicator.
        """
        for module in modules:
            for tensor in itertools.chain(module.parameters(), module.buffers()):
                dist.broadcast(tensor.data, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                               group=self.group)

    def ranks_with(self, flag: bool, device: torch.device) -> list[int]:
        """The ranks where ``flag`` is true. A collective: every rank calls it, outside any capture."""
        flags = torch.zeros(self.world, device=device)
        flags[self.rank] = float(flag)
        dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=self.group)
        return [rank for rank, value in enumerate(flags.tolist()) if value]
