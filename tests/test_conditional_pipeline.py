"""A class-conditional model through the real pipeline: dvc repro on 2 Ray workers (DDP with labels), the
per-class MLflow grid and metrics, the registered (z, label) model, `ganpipe sample --label / --per-class`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO_ROOT, copy_repo, project_params, repo_mlflow_client, run_cmd, small_generator_record

pytestmark = pytest.mark.integration

EPOCHS, CLASSES, SIDE = 2, 10, 28 + 2  # a grid cell: the image and its padding


@pytest.fixture(scope="module")
def conditional_repo(evaluated_repo, tmp_path_factory):
    """One `dvc repro train@mnist` of a small AC-GAN on the synthetic set, with 2 DDP workers (D gives two outputs)."""
    params = project_params(
        model={"name": "dcgan", "channels": 8, "latent_dim": 16, "conditional": "acgan"},
        train={"epochs": EPOCHS, "batch_size": 64, "eval_samples": 200, "log_every": 2},
        ray={"num_workers": 2, "use_gpu": False, "max_failures": 0},
    )
    repo = copy_repo(evaluated_repo, tmp_path_factory.mktemp("conditional"), params)
    run_cmd(["dvc", "repro", "train@mnist"], repo)
    return repo


def test_conditional_run_reports_conditional_accuracy_and_per_class_fid(conditional_repo):
    repo = conditional_repo
    summary = json.loads((repo / "metrics/train/mnist.json").read_text())
    assert summary["status"] == "completed" and 0 <= summary["cond_accuracy"] <= 1
    dvc_metric = json.loads((repo / "metrics/mnist/train.json").read_text())
    assert dvc_metric["cond_accuracy"] == pytest.approx(summary["cond_accuracy"])

    client = repo_mlflow_client(repo)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["model.conditional"] == "acgan" and run.info.run_name == "dcgan+acgan-ns-d1g1"
    history = client.get_metric_history(run.info.run_id, "quality/cond_accuracy")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
    assert history[-1].value == pytest.approx(summary["cond_accuracy"], rel=1e-6)
    per_class = [run.data.metrics[f"quality/fid_class_{k}"] for k in range(CLASSES)]
    accuracy = [run.data.metrics[f"quality/cond_accuracy_{k}"] for k in range(CLASSES)]
    assert all(np.isfinite(per_class)) and min(per_class) > 0
    assert np.mean(accuracy) == pytest.approx(run.data.metrics["quality/cond_accuracy"], abs=1e-9)  # balanced

    # The per-epoch grid (and the DVC plot): fixed noise and labels, one row of 8 per class.
    samples = np.asarray(Image.open(repo / "plots/samples/mnist.png"))
    assert samples.shape[:2] == (2 + CLASSES * SIDE, 2 + 8 * SIDE)
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert sum("samples" in path for path in images) >= EPOCHS


def test_registered_model_takes_z_and_label_and_draws_the_chosen_class(conditional_repo):
    import mlflow.pytorch

    client = repo_mlflow_client(conditional_repo)
    (version,) = client.search_model_versions("name='ganpipe-mnist-generator'")
    info = mlflow.models.get_model_info(f"models:/ganpipe-mnist-generator/{version.version}")
    inputs = info.signature.inputs.to_dict()
    assert [(spec["name"], spec["tensor-spec"]["dtype"]) for spec in inputs] == [("z", "float32"),
                                                                                ("label", "int64")]
    # How to draw its input as training did, beside the model.
    assert info.metadata == {"noise": "gaussian", "latent_dim": 16, "dataset": "mnist", "conditional": "acgan"}
    model = mlflow.pytorch.load_model(f"models:/ganpipe-mnist-generator/{version.version}")
    z = torch.randn(6, 16)
    sevens, threes = model(z, torch.full((6,), 7)), model(z, torch.full((6,), 3))
    assert tuple(sevens.shape) == (6, 1, 28, 28) and sevens.min() >= -1 and sevens.max() <= 1
    assert not torch.allclose(sevens, threes)  # the label, not only z, decides the picture
    # As docs/dvc-mlflow-ray.md loads it: the newest version by name, and a version pinned by an alias.
    client.set_registered_model_alias("ganpipe-mnist-generator", "champion", version.version)
    for uri in ("models:/ganpipe-mnist-generator/latest", "models:/ganpipe-mnist-generator@champion"):
        torch.testing.assert_close(mlflow.pytorch.load_model(uri)(z, torch.full((6,), 7)), sevens)
    assert sorted(info.flavors) == ["pytorch"]  # no python_function flavor: docs/dvc-mlflow-ray.md says how to serve

    # The same weights from the DVC output agree with the registered model, class by class.
    from pipeline.config import ModelConfig
    from pipeline.modeling import build_generator_and_discriminator

    state = torch.load(conditional_repo / "models/mnist/generator.pt", weights_only=True)
    generator, _ = build_generator_and_discriminator(ModelConfig(**state["model"]), "mnist")
    generator.load_state_dict(state["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(generator.eval()(z, torch.full((6,), 7)), sevens, atol=1e-5, rtol=1e-4)


def test_sample_label_and_per_class(conditional_repo, tmp_path):
    repo = conditional_repo
    out = run_cmd(["ganpipe", "sample", "--dataset", "mnist", "--label", "7", "-n", "16", "-o", "sevens.png"],
                  repo).stdout
    assert "class 7" in out
    assert Image.open(repo / "sevens.png").size == (2 + 4 * SIDE, 2 + 4 * SIDE)
    run_cmd(["ganpipe", "sample", "--dataset", "mnist", "--per-class", "3", "-o", str(tmp_path / "rows.png")], repo)
    assert Image.open(tmp_path / "rows.png").size == (2 + 3 * SIDE, 2 + CLASSES * SIDE)  # (width, height)
    bad = run_cmd(["ganpipe", "sample", "--dataset", "mnist", "--label", "12", "-o", "x.png"], repo, check=False)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0
    assert "--label '12' is not a class of mnist (allowed: 0-9" in bad.stderr
    (repo / "sevens.png").unlink()


def save_generator(path, **model) -> None:
    torch.save(small_generator_record(**model), path)


def test_unconditional_generator_asked_for_a_label_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from pipeline import cli

    save_generator(tmp_path / "generator.pt", conditional="none")
    monkeypatch.chdir(tmp_path)
    for option in (["--label", "3"], ["--per-class", "2"]):
        code = cli.main(["--params", str(REPO_ROOT / "params.yaml"), "sample", "--dataset", "mnist",
                         "--checkpoint", "generator.pt", *option, "-o", "x.png"])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1, err
        assert f"{option[0]}: this generator is unconditional (model.conditional: none)" in err
    assert not (tmp_path / "x.png").exists()


def test_sample_rebuilds_the_label_embedding_width_the_checkpoint_was_trained_with(tmp_path, monkeypatch):
    from pipeline import cli

    save_generator(tmp_path / "generator.pt", conditional="acgan", label_embedding=4)
    monkeypatch.chdir(tmp_path)  # params.yaml's label_embedding (16) must not be the one used
    code = cli.main(["--params", str(REPO_ROOT / "params.yaml"), "sample", "--dataset", "mnist",
                     "--checkpoint", "generator.pt", "--label", "3", "-n", "4", "-o", "threes.png"])
    assert code == 0 and Image.open(tmp_path / "threes.png").size == (2 + 2 * SIDE, 2 + 2 * SIDE)
