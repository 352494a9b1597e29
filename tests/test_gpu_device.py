"""The lines that run only on a CUDA device, run on a CPU against fakes of ``torch.cuda``.

Each fake checks its arguments as torch does (with torch's own ``_get_device_index``),
so a call that would raise on a GPU raises here: a trial's device without an index,
for one, fails ``set_per_process_memory_fraction`` at once.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch.cuda._utils import _get_device_index

from gan.graph import CapturedIteration
from pipeline import gpu_share
from pipeline.sweep import TuneTrialWorker, results_table
from pipeline.loop import _device_report
from test_gpu_sharing import sweep_cfg
from test_graph_fallback import batches, make_trainer

GIB = 2**30
OOM = "CUDA out of memory. Tried to allocate 64.00 MiB. GPU 0 has a total capacity of 80.00 GiB of which 1 MiB is free."


class FakeCuda:
    """One 80 GiB device, index 0, that records every call; ``oom_at_capture``: a graph capture runs out of memory."""

    def __init__(self, monkeypatch, oom_at_capture: bool = False):
        self.calls: list[tuple] = []
        self.oom_at_capture = oom_at_capture
        for name in ("set_per_process_memory_fraction", "reset_peak_memory_stats", "max_memory_allocated",
                     "empty_cache", "get_device_properties", "CUDAGraph", "graph"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    @staticmethod
    def index(device, optional: bool) -> int:
        """torch's rule: None or an index-less device means the current one (0) only where optional."""
        if optional and (device is None or isinstance(device, torch.device) and device.index is None):
            return 0
        index = _get_device_index(device)  # ValueError for torch.device("cuda"), as on a GPU
        assert index == 0, f"device {device}: this machine has one GPU"
        return index

    def set_per_process_memory_fraction(self, fraction, device=None) -> None:
        index = 0 if device is None else self.index(device, optional=False)
        if not isinstance(fraction, float):
            raise TypeError("Invalid type for fraction argument, must be `float`")
        if not 0 <= fraction <= 1:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
        self.calls.append(("set_per_process_memory_fraction", fraction, index))

    def reset_peak_memory_stats(self, device=None) -> None:
        self.calls.append(("reset_peak_memory_stats", self.index(device, optional=True)))

    def max_memory_allocated(self, device=None) -> int:
        self.calls.append(("max_memory_allocated", self.index(device, optional=True)))
        return 3 * GIB

    def empty_cache(self) -> None:
        self.calls.append(("empty_cache",))

    def get_device_properties(self, device=None):
        self.calls.append(("get_device_properties", self.index(device, optional=True)))
        return SimpleNamespace(total_memory=80 * GIB, name="Fake GPU")

    def CUDAGraph(self):  # noqa: N802 - torch's name
        def register_generator_state(generator) -> None:
            assert isinstance(generator, torch.Generator), generator

        return SimpleNamespace(register_generator_state=register_generator_state)

    @contextlib.contextmanager
    def graph(self, cuda_graph, pool=None, stream=None, capture_error_mode: str = "global"):
        assert capture_error_mode in ("global", "thread_local", "relaxed"), capture_error_mode
        self.calls.append(("graph", capture_error_mode))
        if self.oom_at_capture:
            raise torch.OutOfMemoryError(OOM)
        yield


def test_a_gpu_trial_takes_device_0_resets_its_peak_and_caps_its_share(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    worker = TuneTrialWorker(use_gpu=True)
    assert worker.device == torch.device("cuda", 0)
    with gpu_share.memory_share(worker.device, 0.25):
        pass
    assert cuda.calls == [("reset_peak_memory_stats", 0), ("set_per_process_memory_fraction", 0.25, 0)]


def test_the_fakes_refuse_a_cuda_device_without_an_index_as_torch_does(monkeypatch):
    FakeCuda(monkeypatch)
    with pytest.raises(ValueError, match="specified index"):
        with gpu_share.memory_share(torch.device("cuda"), 0.25):
            pass


def test_a_capture_out_of_memory_fails_the_trial_naming_its_share_instead_of_training_eagerly(monkeypatch):
    cuda = FakeCuda(monkeypatch, oom_at_capture=True)
    trainer = make_trainer()
    trainer.graph = CapturedIteration(trainer)  # the graph path on a CPU trainer: capture is the fake's
    worker = TuneTrialWorker(use_gpu=True)
    with pytest.raises(gpu_share.TrialOutOfMemory) as info:
        with gpu_share.memory_share(worker.device, 0.25):
            trainer.train_epoch(batches())
    assert str(info.value) == ("out of GPU memory within this trial's share, 1/4 of the GPU (20.0 GiB), set by "
                               "sweep.trials_per_gpu: CUDA out of memory. Tried to allocate 64.00 MiB; "
                               "lower sweep.trials_per_gpu or the batch size")
    assert ("graph", "thread_local") in cuda.calls  # the capture was reached, after the eager warm-ups
    assert cuda.calls[-2:] == [("empty_cache",), ("get_device_properties", 0)]
    assert trainer.graph_fallback_reason is None  # not passed off as a graph problem


def test_a_gpu_run_reports_its_peak_memory_of_its_own_device(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    trainer = SimpleNamespace(device=torch.device("cuda", 0), use_graph=True, graph_fallback_reason=None)
    assert _device_report(trainer) == {"cuda_graph": True, "graph_fallback_reason": None, "peak_memory_gib": 3.0}
    assert cuda.calls == [("max_memory_allocated", 0)]


def test_each_sweep_row_says_how_its_trial_trained():
    trained = SimpleNamespace(
        metrics={"trial_id": "run_trial_00000", "epoch": 1, "status": "completed", "fid": 3.0, "time_total_s": 9.0,
                 "cuda_graph": False, "graph_fallback_reason": "capture raised RuntimeError: x",
                 "peak_memory_gib": 2.5},
        error=None, config={"lr_d": 0.1}, path="run_trial_00000", checkpoint=None)
    failed = SimpleNamespace(metrics={}, error=RuntimeError("boom"), config={"lr_d": 0.2}, path="run_trial_00001",
                             checkpoint=None)
    table = results_table([trained, failed], sweep_cfg(space={"lr_d": [0.1, 0.2]}), {}, {})
    columns = ["cuda_graph", "graph_fallback_reason", "peak_memory_gib"]
    assert table.loc[0, columns].to_dict() == {"cuda_graph": False, "peak_memory_gib": 2.5,
                                               "graph_fallback_reason": "capture raised RuntimeError: x"}
    assert table.loc[1, columns].isna().all()  # a trial that never reported: nothing known
