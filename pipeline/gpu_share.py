"""Sweep trials sharing a GPU: each trial's memory cap, and a trial that runs out of memory recorded as failed.

Ray's fractional GPUs are plain scheduling: ``sweep.trials_per_gpu`` = N trials
asking for 1/N of a GPU each land on the same device, and nothing isolates their
memory. So each trial caps its own PyTorch allocator at its share
(``torch.cuda.set_per_process_memory_fraction``): a greedy trial fails alone, with
a reason that names the knob, instead of starving its neighbours. Tune records the
failed trial and the sweep goes on (``pipeline.sweep``: results.csv and the child
MLflow run hold the reason).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class TrialOutOfMemory(RuntimeError):
    """A trial ran out of GPU memory within its share; the message is one line naming sweep.trials_per_gpu."""


def reason(error: BaseException) -> str:
    """The one-line reason of a trial's error: the message of a TrialOutOfMemory, else Ray's text of it."""
    cause = getattr(error, "cause", None)  # Ray's RayTaskError wraps what the trial raised
    if isinstance(cause, TrialOutOfMemory) or isinstance(error, TrialOutOfMemory):
        return str(cause if isinstance(cause, TrialOutOfMemory) else error)
    return str(error)


@contextmanager
def memory_share(device: torch.device, share: float):
    """Cap this process's CUDA allocator at ``share`` of the device; turn an OOM into a TrialOutOfMemory."""
    if device.type == "cuda" and share < 1:
        torch.cuda.set_per_process_memory_fraction(share, device)
    try:
        yield
    except torch.OutOfMemoryError as err:
        first = ". ".join(str(err).split(". ")[:2]).strip()  # "CUDA out of memory. Tried to allocate 2.00 GiB"
        cap = ""
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the process serves no next trial, but its neighbours want the memory
            cap = f" ({share * torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB)"
        raise TrialOutOfMemory(
            f"out of GPU memory within this trial's share, 1/{round(1 / share)} of the GPU{cap}, set by "
            f"sweep.trials_per_gpu: {first}; lower sweep.trials_per_gpu or the batch size") from None
