"""What a user sees around the runs: the experiment kind, `dvc metrics`/`plots`, the progress feed.

(The progress bars on a terminal: tests/test_fetch_preprocess.py draws them in its one-dataset `dvc repro`.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import run_cmd
from pipeline import tracking

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
