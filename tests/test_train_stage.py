"""The train stage end to end: real `dvc repro`, real Ray (2 CPU workers), real MLflow store."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import (FIXTURE_EVALUATOR, UNUSED_MIRROR, copy_repo, end_process_tree, image_steps, make_dvc_repo,
                      project_params, read_until, repo_mlflow_client, run_cmd, tool_env, write_params)

pytestmark = pytest.mark.integration


def small_params(mirror_url: str, **train) -> dict:
    """The project's params, shrunk to seconds per epoch on the synthetic fixture."""
    return project_params(
        data={"datasets": ["mnist"], "mirrors": {"mnist": [mirror_url]}, "verify_checksums": False},
        model={"name": "dcgan", "channels": 8, "latent_dim": 16},
        train={"epochs": 2, "batch_size": 64, "eval_samples": 200, "log_every": 2, **train},
        evaluator=FIXTURE_EVALUATOR,
        ray={"num_workers": 2, "use_gpu": False, "max_failures": 2},
    )


def only_run(client, dataset="mnist"):
    """The one run of the train stage (a sweep's runs share its experiment)."""
    experiment = client.get_experiment_by_name(f"ganpipe-{dataset}")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`dvc.stage` = 'train@{dataset}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


EPOCHS = 5  # enough left after the checkpoint of epoch 3 to kill a run mid-way and cut its newest checkpoint


def reference_params(mirror_url: str) -> dict:
    return small_params(mirror_url, epochs=EPOCHS, eval_samples=1000)


@pytest.fixture(scope="module")
def evaluated(evaluated_repo, tmp_path_factory) -> Path:
    """The shared evaluated repository with this module's params, the train stage not yet run: tests train in
    copies of it (``copy_repo``), where DVC finds the stages before train up to date."""
    return copy_repo(evaluated_repo, tmp_path_factory.mktemp("evaluated"), reference_params(UNUSED_MIRROR))


@pytest.fixture(scope="module")
def trained(evaluated, tmp_path_factory):
    """One uninterrupted `dvc repro train@mnist`: (repo, its output, its end-of-run report as it first was)."""
    repo = copy_repo(evaluated, tmp_path_factory.mktemp("trained"))
    result = run_cmd(["dvc", "repro", "train@mnist"], repo)
    assert "Running stage 'evaluator@mnist'" not in result.stdout  # the copy's earlier stages are up to date
    return repo, result.stdout + result.stderr, json.loads((repo / "metrics/train/mnist.json").read_text())


def test_dvc_repro_trains_logs_and_writes_outputs(trained, tmp_path):
    repo, output, _ = trained
    assert f"epoch {EPOCHS}/{EPOCHS}" in output  # rank 0's progress line reaches the console

    # DVC outputs
    summary = json.loads((repo / "metrics/train/mnist.json").read_text())
    for key in ("fid", "kid", "inception_score", "class_coverage", "class_kl", "cond_accuracy", "loss_d", "loss_g",
                "images_per_sec", "wall_seconds", "mlflow_run_id"):
        assert key in summary, key
    assert summary["status"] == "completed" and summary["epoch"] == EPOCHS
    assert summary["fid"] > 0 and 0 <= summary["class_coverage"] <= 1 and summary["images_per_sec"] > 0
    losses = pd.read_csv(repo / "plots/losses/mnist.csv")
    assert {"step", "loss_d", "loss_g", "d_real", "d_fake"} <= set(losses.columns)
    assert losses["step"].is_monotonic_increasing and np.isfinite(losses[["loss_d", "loss_g"]]).all().all()
    quality = pd.read_csv(repo / "plots/quality/mnist.csv")
    assert list(quality["epoch"]) == list(range(1, EPOCHS + 1)) and (quality["fid"] > 0).all()
    assert (repo / "plots/samples/mnist.png").read_bytes().startswith(b"\x89PNG")
    checkpoint = torch.load(repo / "models/mnist/checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == EPOCHS

    # MLflow: params, curves, images, registered model
    client = repo_mlflow_client(repo)
    run = only_run(client)
    assert run.info.run_id == summary["mlflow_run_id"]
    assert run.info.status == "FINISHED" and run.info.run_name == "dcgan+acgan-ns-d1g1"  # the default is acgan
    assert run.data.params["train.lr_g"] == "0.0002" and run.data.params["model.channels"] == "8"
    for tag in ("git.commit", "git.dirty", "dvc.stage", "ray.run_name", "params.hash"):
        assert tag in run.data.tags, tag
    assert run.data.tags["dvc.stage"] == "train@mnist"
    loss_history = client.get_metric_history(run.info.run_id, "loss/d")
    assert len(loss_history) == len(losses) >= 2
    fid_history = client.get_metric_history(run.info.run_id, "quality/fid")
    assert sorted(m.step for m in fid_history) == list(range(1, EPOCHS + 1))
    assert pytest.approx(fid_history[-1].value, rel=1e-6) == summary["fid"]
    assert client.get_metric_history(run.info.run_id, "speed/img_per_s")
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert {"checkpoint", "reference", "images"} <= set(artifacts)
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert sum("samples" in path for path in images) >= EPOCHS  # one grid per epoch

    import mlflow.pytorch

    (version,) = client.search_model_versions("name='ganpipe-mnist-generator'")
    assert version.run_id == run.info.run_id
    model = mlflow.pytorch.load_model(f"models:/ganpipe-mnist-generator/{version.version}")
    out = model(torch.randn(4, 16), torch.arange(4))  # the default acgan's generator takes (z, label)
    assert tuple(out.shape) == (4, 1, 28, 28)
    assert out.min() >= -1 and out.max() <= 1

    # ganpipe sample from the DVC output and from the MLflow run
    run_cmd(["ganpipe", "sample", "--dataset", "mnist", "-n", "16", "-o", "grid.png"], repo)
    from PIL import Image

    grid = Image.open(repo / "grid.png")
    assert grid.size == (4 * 28 + 5 * 2, 4 * 28 + 5 * 2)
    run_cmd(["ganpipe", "sample", "--dataset", "mnist", "--mlflow-run", run.info.run_id, "-n", "9",
             "-o", str(tmp_path / "from_mlflow.png")], repo)
    assert Image.open(tmp_path / "from_mlflow.png").size == (3 * 28 + 4 * 2, 3 * 28 + 4 * 2)
    (repo / "grid.png").unlink()

    # ganpipe evaluate prints the model's metrics next to the evaluator's floor
    table = run_cmd(["ganpipe", "evaluate", "--dataset", "mnist", "-n", "200"], repo).stdout
    assert "floor (real vs real)" in table and "noise ceiling" in table
    fid_row = next(line.split() for line in table.splitlines() if line.startswith("fid "))
    floor = json.loads((repo / "metrics/evaluator/mnist.json").read_text())["real_vs_real"]["fid"]
    assert float(fid_row[1]) > 0 and float(fid_row[2]) == pytest.approx(floor, abs=1e-4)

    # dvc exp run -S changes one knob, names the MLflow run after the experiment and shows up in dvc exp show
    run_cmd(["git", "add", "-A"], repo)
    run_cmd(["git", "commit", "-qm", "baseline"], repo)
    # One epoch of 4 iterations, shorter than log_every: its losses are still logged, once.
    experiment_run = run_cmd(["dvc", "exp", "run", "-n", "lineage-check", "train@mnist", "-S", "train.lr_g=0.001",
                              "-S", "train.epochs=1", "-S", "train.log_every=1000"], repo)
    logs = experiment_run.stdout + experiment_run.stderr
    assert "epoch 1/1" in logs and "%|" not in logs  # no progress bar off a terminal: the logs stay plain
    short_run = json.loads((repo / "metrics/train/mnist.json").read_text())["mlflow_run_id"]
    tagged = client.get_run(short_run)
    assert tagged.data.tags["dvc.exp_name"] == "lineage-check" and tagged.data.params["train.lr_g"] == "0.001"
    assert len(client.get_metric_history(short_run, "loss/d")) == 1
    assert list(pd.read_csv(repo / "plots/losses/mnist.csv")["epoch"]) == [1]
    shown = json.loads(run_cmd(["dvc", "exp", "show", "--json"], repo).stdout)
    experiments = [exp for entry in shown for exp in (entry.get("experiments") or [])]
    lrs = [rev["data"]["params"]["params.yaml"]["data"]["train"]["lr_g"]
           for exp in experiments for rev in exp["revs"]]
    assert 0.001 in lrs


def stale_run(client, stage: str) -> str:
    """A RUNNING run of ``stage`` whose driver is gone (a pid that no longer lives): what SIGKILL leaves behind."""
    from pipeline import resume

    dead = subprocess.Popen(["true"])
    dead.wait()
    experiment = client.get_experiment_by_name("ganpipe-mnist")
    run = client.create_run(experiment.experiment_id, run_name="stale", tags={
        "dvc.stage": stage, resume.TAG_IDENTITY: "another-identity",
        resume.TAG_DRIVER: f"{socket.gethostname()} {dead.pid} {time.time():.2f}"})
    return run.info.run_id


def settled_snapshot(path) -> dict:
    """Ray's checkpoint list once it stops changing: Train's controller actor outlives a killed driver briefly,
    and may register one more checkpoint meanwhile."""
    last, unchanged_since = None, time.monotonic()
    while time.monotonic() - unchanged_since < 10:
        current = path.read_text()
        if current != last:
            last, unchanged_since = current, time.monotonic()
        time.sleep(1)
    return json.loads(last)


def test_killed_driver_resumes_from_its_checkpoint_in_the_same_mlflow_run(trained, evaluated, tmp_path):
    """A SIGKILLed driver whose newest checkpoint was also cut short (killed while writing, a full disk):
    the re-run resumes from the checkpoint before it, in the same MLflow run, and ends exactly where an
    uninterrupted run does."""
    _, _, reference = trained  # uninterrupted, same params and seed
    repo = copy_repo(evaluated, tmp_path)

    # The same run, SIGKILLed with its whole process group, DVC and the driver, once Ray has registered
    # the checkpoint of epoch 3.
    process = subprocess.Popen(["dvc", "repro", "train@mnist"], cwd=repo, text=True, env=tool_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen: list[str] = []
    try:
        read_until(process, r"checkpoint of epoch 3 saved", seen)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        end_process_tree(process)
    client = repo_mlflow_client(repo)
    killed = client.search_runs([client.get_experiment_by_name("ganpipe-mnist").experiment_id])
    assert len(killed) == 1 and killed[0].info.status == "RUNNING"  # nothing could end it
    stale_id = stale_run(client, "train@mnist")

    (run_folder,) = (repo / "ray_results").glob("train-mnist-*")
    snapshot = settled_snapshot(run_folder / "checkpoint_manager_snapshot.json")
    newest = run_folder / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]  # what a resume starts from
    before = max(path for path in run_folder.glob("checkpoint_*") if path.is_dir() and path.name < newest.name)
    epoch = torch.load(newest / "rank0.pt", weights_only=True)["epoch"]
    cut = newest / "rank0.pt"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])

    result = run_cmd(["dvc", "repro", "train@mnist"], repo)  # DVC removed the outputs: it runs the stage again
    output = result.stdout + result.stderr
    assert f"resuming the interrupted MLflow run {killed[0].info.run_id}" in output, "".join(seen)[-3000:]
    (warning,) = [line for line in output.splitlines() if "is unreadable" in line] or [output[-3000:]]
    assert re.search(rf"warning: the newest checkpoint \S*{newest.name} is unreadable \(.+\); "
                     rf"resuming from the one before it, \S*{before.name}$", warning), warning
    assert f"resumed from the checkpoint of epoch {epoch - 1}" in output
    summary = json.loads((repo / "metrics/train/mnist.json").read_text())
    assert summary["mlflow_run_id"] == killed[0].info.run_id and summary["epoch"] == EPOCHS
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["ganpipe.resumed_from_epoch"] == str(epoch - 1)
    # The lost attempt logged epoch(s) past the checkpoint it resumed from: MLflow holds each step once.
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "quality/fid")) == \
        list(range(1, EPOCHS + 1))
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/d")]
    assert len(loss_steps) == len(set(loss_steps)) > 0
    assert image_steps(client, run.info.run_id) == list(range(1, EPOCHS + 1))  # one grid per epoch
    # Resume is exact, from either checkpoint: the interrupted run ends where the uninterrupted one did.
    for key in ("fid", "kid", "class_coverage", "loss_d", "loss_g"):
        assert summary[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key

    stale = client.get_run(stale_id)  # ended by the stage that started next
    assert stale.info.status == "KILLED" and stale.data.tags["ganpipe.status"] == "interrupted"
    running = [r for r in client.search_runs([run.info.experiment_id]) if r.info.status == "RUNNING"]
    assert not running


def test_diverged_run_is_marked_failed_with_reason(evaluated, tmp_path):
    repo = copy_repo(evaluated, tmp_path)
    params = write_params(repo, "diverged.yaml", train={"optimizer": "sgd", "lr_d": 1e30, "lr_g": 1e30, "epochs": 2},
                          model={"name": "mlp", "hidden": [32, 64]}, ray={"num_workers": 1})
    result = run_cmd(["ganpipe", "--params", params, "train", "--dataset", "mnist"], repo, check=False)
    assert result.returncode == 1
    assert "diverged" in result.stderr and "Traceback" not in result.stderr
    run = only_run(repo_mlflow_client(repo))
    assert run.info.status == "FAILED"
    assert run.data.tags["ganpipe.status"] == "diverged"
    assert "step" in run.data.tags["ganpipe.failure_reason"]


def test_gaussian1d_pipeline_learns_the_distribution(tmp_path):
    """The 1-D demo through the whole pipeline, its sweep included: nothing to fetch, and the GAN must really learn
    N(4, 0.5)."""
    params = project_params(
        data={"datasets": ["gaussian1d"]},
        model={"name": "toy1d", "latent_dim": 4, "hidden": [32, 32], "conditional": "none"},
        train={"epochs": 3, "batch_size": 128, "lr_g": 1e-3, "lr_d": 1e-3, "eval_samples": 5000, "log_every": 200},
        ray={"num_workers": 1, "use_gpu": False},
        sweep={"metric": "wasserstein", "space": {"lr_g": [1e-3]}, "num_samples": 1, "epochs": 1,
               "scheduler": "fifo"},
    )
    repo = make_dvc_repo(tmp_path / "repo", params)
    run_cmd(["dvc", "repro"], repo)
    swept = pd.read_csv(repo / "sweep/results.csv")
    assert len(swept) == 1 and swept["wasserstein"].between(0, 10).all(), swept
    assert list(swept["epochs_run"]) == [1]  # counted on the sweep's own metric
    summary = json.loads((repo / "metrics/gaussian1d/train.json").read_text())
    assert abs(summary["mean"] - 4.0) < 0.3 and abs(summary["std"] - 0.5) < 0.25, summary
    assert summary["wasserstein"] < 0.3
    quality = pd.read_csv(repo / "plots/quality/gaussian1d.csv")
    assert list(quality["epoch"]) == [1, 2, 3]
    client = repo_mlflow_client(repo)
    run = only_run(client, "gaussian1d")
    densities = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert sum("samples" in path for path in densities) >= 3  # the density plot, once per epoch
    assert (repo / "data/processed/gaussian1d_real.png").read_bytes().startswith(b"\x89PNG")
