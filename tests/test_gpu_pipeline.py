"""The one-call GPU benchmark, kept whole on a CPU: its smoke run, its time plan, its preflight, its clean-ups.

The GPU run gets one short call on a machine that is rarely available; whatever
would break it must break here first.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import time
from argparse import Namespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from helpers import REPO_ROOT, synthetic_idx_files, tool_env
from pipeline import cluster, resources
from pipeline.resources import ClusterError, Node
from pipeline.config import validate

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import gpu_pipeline  # noqa: E402
import gpu_run  # noqa: E402

SMOKE_SECTIONS = ("stages", "train", "engine", "sweep_1", "dp_graph", "export")


@pytest.mark.integration
def test_the_cpu_smoke_runs_every_section(tmp_path):
    data = tmp_path / "mnist"
    data.mkdir()
    for name, content in synthetic_idx_files(n_train=400, n_test=200).items():
        (data / name).write_bytes(content)
    report = tmp_path / "smoke.json"
    # Cut to fit the suite: one train epoch, one sweep; the default trials_per_gpu and the comparison run add
    # nothing on a CPU that these sections do not already run.
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_pipeline.py", "--data", str(data), "--device", "cpu", "--smoke",
         "--smoke-epochs", "1", "--trials-per-gpu", "1", "--compare", "skip", "--out", str(tmp_path / "out"),
         "--json", str(report)], cwd=REPO_ROOT, env=tool_env(), capture_output=True, text=True, timeout=600)
    print(f"smoke: {time.perf_counter() - started:.0f} s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sections = json.loads(report.read_text())
    broken = {name: sections.get(name, "missing") for name in SMOKE_SECTIONS
              if not isinstance(sections.get(name), dict) or {"error", "skipped"} & set(sections[name])}
    assert not broken, broken
    assert sections["train"]["cuda_graph"] is False and sections["train"]["status"] == "completed"
    assert sections["engine"]["cuda_graph"] is False
    assert sections["dp_graph"]["eager_all_reduce_equals_eager"] and sections["dp_graph"]["max_abs_diff_all"] == 0
    assert sections["export"]["grid_written"]
    row = sections["sweep"][0]
    assert row["trials_finished"] == row["trials"] == 2
    assert all(trial["cuda_graph"] is False and trial["graph_fallback_reason"] is None
               and trial["peak_memory_gib"] is None for trial in row["per_trial"])  # a CPU has no GPU memory


@pytest.mark.integration
def test_gpu_check_runs_whole_on_a_cpu(tmp_path):
    """benchmarks/gpu_check.py (the engine alone, torch only) at a tiny budget: throughput, graph against eager and
    the default config's quality, each section present, with the engine built from params.yaml's train section."""
    data = tmp_path / "data" / "mnist"
    data.mkdir(parents=True)
    for name, content in synthetic_idx_files(n_train=1100, n_test=200).items():  # batch 512 needs 2 batches
        (data / name).write_bytes(content)
    report = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--data-root", str(tmp_path / "data"), "--datasets", "mnist",
         "--device", "cpu", "--epochs", "1", "--eval-samples", "100", "--steps", "1", "--warmup", "1",
         "--iterations", "4", "--out", str(report)], cwd=REPO_ROOT, env=tool_env(), capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sections = json.loads(report.read_text())
    assert {row["loop"] for row in sections["throughput"]} >= {"tutorial", "eager fp32", "graph fp32"}
    assert sections["graph_vs_eager"]["fp32"]["iterations"] == 4
    assert sections["graph_vs_eager"]["fp32"]["graph_ran"] is False  # a CPU trains eagerly
    assert sections["default_mnist"]["graph"]["scores"][0]["fid"] > 0


def test_a_gpu_run_asks_ray_for_a_gpu_and_fails_where_it_sees_none():
    params = json.loads(json.dumps(gpu_pipeline.yaml.safe_load((REPO_ROOT / "params.yaml").read_text())))
    args = Namespace(sweep_epochs=2, trials_per_gpu=None, smoke=False)
    gpu_pipeline.adjust_for(args, torch.device("cuda"))(params)
    assert params["ray"]["use_gpu"] is True  # never auto: no silent fall-back to hours on the CPU
    params["ray"]["num_workers"] = 1
    cfg = validate(params)
    cpus_only = [Node("0" * 56, "10.0.0.1", {"CPU": 16.0})]
    use_gpu = resources.resolve_use_gpu(cfg.ray.use_gpu, cpus_only)
    with pytest.raises(ClusterError, match="set ray.use_gpu: false"):
        resources.check_resources(cfg, cpus_only, workers=1, use_gpu=use_gpu, key="ray.num_workers")


@pytest.fixture
def plan(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_run, "BUDGET_S", {"short": (2, 2), "long": (60, 60)})
    monkeypatch.setattr(gpu_run, "ALARM_GRACE_S", 1)
    return gpu_run.Plan(gpu_run.Report(tmp_path / "run.json"), started=time.time(), deadline_s=30, smoke=False)


def test_a_section_starts_only_if_its_budget_fits_before_the_deadline(plan):
    assert plan.run("long", lambda: pytest.fail("started past the deadline")) == {
        "skipped": "its budget of 60 s does not fit the 30 s left"}
    assert plan.run("short", lambda: {"ok": True})["ok"]
    assert json.loads(plan.report.path.read_text())["long"]["skipped"]


def test_a_hung_command_is_killed_with_its_children_at_its_sections_budget(plan, tmp_path):
    marker = tmp_path / "child-still-ran"
    started = time.perf_counter()
    value = plan.run("short", lambda: gpu_run.command(
        ["sh", "-c", f"(sleep 4; touch {marker}) & sleep 30"], tmp_path, tmp_path / "hung.log"))
    assert time.perf_counter() - started < 4
    assert "ran past its section's budget (2 s)" in value["error"]
    time.sleep(3)
    assert not marker.exists()  # its process group went with it (Ray's processes, in the real run)


def test_work_in_this_process_is_cut_at_its_budget_by_an_alarm(plan):
    started = time.perf_counter()
    value = plan.run("short", lambda: time.sleep(30))
    assert time.perf_counter() - started < 5 and value["error"] == "SectionOverrun: ran past its budget"


def test_the_data_parallel_section_drops_its_graph_before_the_process_group_even_after_an_error(
        tmp_path, monkeypatch):
    from gan.engine import GANTrainer
    from pipeline import artifacts

    events = []

    def failing_epoch(self, batches):
        self.graph = Namespace(reset=lambda: events.append("graph reset"))  # as after a capture
        raise RuntimeError("a step failed after the capture")

    destroy = dist.destroy_process_group
    monkeypatch.setattr(GANTrainer, "train_epoch", failing_epoch)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: (events.append("destroy"), destroy()))
    monkeypatch.setattr(artifacts, "load_processed", lambda dataset, root: {
        "x_train": np.zeros((64, 1, 28, 28), np.uint8), "y_train": np.arange(64) % 10})
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path)
    with pytest.raises(RuntimeError, match="after the capture"):
        gpu_pipeline.dp_graph(tmp_path, torch.device("cpu"), iterations=5)
    assert events == ["graph reset", "destroy"]


def test_the_preflight_unpacks_without_xz_and_records_what_fails_to_import(tmp_path):
    package = tmp_path / "packed" / "optuna"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('a broken optuna in the bundle')\n")
    with tarfile.open(tmp_path / "site.tar.xz", "w:xz") as archive:
        archive.add(tmp_path / "packed", arcname=".")
    site, report = tmp_path / "site", tmp_path / "run.json"
    done = subprocess.run(  # a PATH with neither xz nor nvidia-smi
        [sys.executable, str(REPO_ROOT / "benchmarks/gpu_preflight.py"), "--bundle", str(tmp_path / "site.tar.xz"),
         "--site", str(site), "--json", str(report)], env={**tool_env(), "PATH": str(tmp_path)},
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    preflight = json.loads(report.read_text())["preflight"]
    assert (site / "optuna" / "__init__.py").exists()
    assert set(preflight["failed"]) == {"optuna", "nvidia-smi"}
    assert preflight["failed"]["optuna"] == "ImportError: a broken optuna in the bundle"
    assert preflight["gpus"] == [] and preflight["seconds"] < 60


def test_ray_starts_without_its_dashboard_where_the_dashboard_cannot_import(monkeypatch, capsys):
    import ray

    calls = []
    monkeypatch.setitem(sys.modules, "ray.dashboard.optional_deps", None)  # importing it raises ImportError
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    cluster.connect(validate(gpu_pipeline.yaml.safe_load((REPO_ROOT / "params.yaml").read_text())))
    assert calls == [{"address": "local", "logging_level": "warning", "include_dashboard": False}]
    assert "no dashboard" in capsys.readouterr().out
