"""What a user sees around the runs: the experiment kind, lineage to `dvc exp`, `dvc metrics`/`plots`, progress."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import UNUSED_MIRROR, copy_repo, project_params, run_cmd, tool_env
from pipeline import tracking

BAR = "%|"  # tqdm's "100%|███|": a progress bar was drawn


def store(repo: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")


def test_experiments_are_marked_as_model_training_also_when_an_older_version_made_them(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    older = client.create_experiment("ganpipe-mnist")  # as versions before the tag made it
    assert tracking.ensure_experiment(client, "ganpipe-mnist", tmp_path) == older
    created = tracking.ensure_experiment(client, "ganpipe-fashion_mnist", tmp_path)
    for experiment_id in (older, created):
        assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_engine_hands_each_read_back_to_on_read():
    """The progress bar's feed: the rows the engine reads back anyway, as they happen."""
    import torch

    from gan.engine import GANTrainer
    from gan.models import build_models
    from helpers import engine_config

    torch.manual_seed(0)
    trainer = GANTrainer(*build_models("mlp", (1, 28, 28), latent_dim=8, hidden=(16, 16)), engine_config(log_every=2),
                         device="cpu")
    rows = []
    result = trainer.train_epoch(list(torch.rand(6, 16, 1, 28, 28) * 2 - 1), on_read=rows.append)
    assert [row["step"] for row in rows] == [2, 4, 6] and rows == result.history


@pytest.mark.integration
def test_dvc_metrics_and_plots_read_well_with_one_dataset(swept_repo, tmp_path):
    repo, _ = swept_repo  # data.datasets lists mnist only; train and sweep ran
    experiment = store(repo).get_experiment_by_name("ganpipe-mnist")  # made by the sweep, used by train
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    shown = run_cmd(["dvc", "metrics", "show"], repo).stdout
    header = shown.splitlines()[0].split()
    assert header[0] == "Path" and len(header) <= 20, shown
    assert max(map(len, shown.splitlines())) <= 200, shown
    assert {"fid", "test_accuracy", "floor.fid", "best_fid"} <= set(header)
    assert not any(key.startswith(("noise", "single_class", "train.", "test.")) for key in header), header

    plots = run_cmd(["dvc", "plots", "show", "-o", str(tmp_path / "dvc_plots")], repo)
    assert "failed to load" not in plots.stdout + plots.stderr and "WARNING" not in plots.stdout + plots.stderr
    drawn = json.loads(run_cmd(["dvc", "plots", "show", "--json"], repo).stdout)
    assert not drawn.get("errors") and set(drawn["data"]) == {
        "plots/losses/mnist.csv", "plots/quality/mnist.csv", "plots/samples/mnist.png"}


def lineage_params(mirror_url: str) -> dict:
    """Seconds per stage on the synthetic fixture; a 2-trial sweep of one epoch each."""
    params = project_params(
        data={"datasets": ["mnist"], "mirrors": {"mnist": [mirror_url]}, "verify_checksums": False},
        model={"name": "mlp", "hidden": [32, 64], "latent_dim": 16},
        train={"epochs": 1, "batch_size": 64, "optimizer": "sgd", "lr_g": 0.01, "lr_d": 0.01,
               "eval_samples": 200, "log_every": 1},
        ray={"use_gpu": False, "num_workers": 1},
    )
    params["sweep"].update(dataset="mnist", space={"lr_d": [0.01, 0.02]}, num_samples=1, scheduler="fifo",
                           epochs=1, num_workers=1, max_concurrent_trials=1)
    return params


@pytest.fixture(scope="module")
def small_repo(evaluated_repo, tmp_path_factory) -> Path:
    return copy_repo(evaluated_repo, tmp_path_factory.mktemp("lineage"), lineage_params(UNUSED_MIRROR))


def on_a_terminal(args: list[str], cwd: Path, timeout: float = 600) -> str:
    """Run a command with stdout and stderr on a pseudo-terminal; everything it drew."""
    controller, terminal = pty.openpty()
    # 50 rows x 160 columns: a terminal of size 0 x 0 gives tqdm no room to draw
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    process = subprocess.Popen(args, cwd=cwd, env=tool_env(), stdin=subprocess.DEVNULL,
                               stdout=terminal, stderr=terminal)
    os.close(terminal)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if ready:
                try:
                    chunks.append(os.read(controller, 65536))
                except OSError:  # every writer closed the terminal
                    break
            elif process.poll() is not None:  # exited; Ray's daemons may still hold the terminal open
                break
            assert time.monotonic() < deadline, f"{args} did not finish in {timeout} s"
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    output = b"".join(chunks).decode(errors="replace")
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.mark.integration
def test_progress_bars_show_on_a_terminal(small_repo):
    train = on_a_terminal(["ganpipe", "train", "--dataset", "mnist"], small_repo)
    assert BAR in train and "epoch 1/1 it 4/4 loss_d" in train and "img/s" in train

    sweep = on_a_terminal(["ganpipe", "sweep"], small_repo)
    assert "sweep: 100%" in sweep and "2/2" in sweep and "best fid" in sweep
