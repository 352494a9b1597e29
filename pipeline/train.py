"""train@<dataset>: data-parallel GAN training on Ray Train, tracked in MLflow and DVC.

Driver (``run``): creates the MLflow run, fits a ``TorchTrainer`` and turns the
final checkpoint into the DVC outputs (models/, metrics/, plots/).

Before the run is created, ``pipeline.cluster`` joins Ray and checks the
cluster (batch split, resources, shared storage_path, a reachable MLflow), then
puts the processed arrays and the evaluator in Ray's object store: workers read
nothing from the head's disk.

The workers run ``pipeline.loop``: each trains its shard of the data with the
engine in ``gan/``, checkpoints to ``ray.storage_path`` and survives a killed
worker. A killed driver is survived too: the Ray run is named after the run's identity
(``pipeline.resume``), so running the stage again finds the interrupted run's
checkpoints in ``ray.storage_path`` and its MLflow run, and continues both.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from pipeline import cluster, driver, resources, tracking
from pipeline.config import Config, ModelConfig
from pipeline.loop import fit, read_status, storage_path
from pipeline.modeling import build_generator_and_discriminator
from pipeline.progress import Stopwatch, checkpoint_callback
from pipeline.artifacts import load_processed, processed_paths


def output_paths(dataset: str, root: Path) -> dict[str, Path]:
    return {
        "generator": root / "models" / dataset / "generator.pt",
        "checkpoint": root / "models" / dataset / "checkpoint.pt",
        "metrics": root / "metrics" / dataset / "train.json",  # the DVC metric
        "report": root / "metrics" / "train" / f"{dataset}.json",  # everything about the run's end
        # One folder per kind of plot: dvc.yaml's top-level plots name the folders,
        # so they draw whichever datasets data.datasets lists.
        "losses": root / "plots" / "losses" / f"{dataset}.csv",
        "quality": root / "plots" / "quality" / f"{dataset}.csv",
        "samples": root / "plots" / "samples" / f"{dataset}.png",
    }


def run(cfg: Config, dataset: str, root: Path = Path("."), fresh: bool = False) -> dict:
    """Train, or resume the interrupted run with the same identity (``fresh``: start over)."""
    root = root.resolve()
    stage = f"train@{dataset}"
    clock = Stopwatch()
    # Every check before the MLflow run exists: a bad setting leaves nothing RUNNING.
    arrays = load_processed(dataset, root)
    auto_workers = cfg.ray.num_workers == "auto"
    if not auto_workers:  # a fixed count is checked before Ray starts
        _check_batch(cfg, len(arrays["x_train"]))
    uri, storage = tracking.tracking_uri(cfg, root), storage_path(cfg, root)
    nodes = cluster.start(cfg)
    use_gpu = resources.resolve_use_gpu(cfg.ray.use_gpu, nodes)
    if auto_workers:  # from here on, the run's config holds the number of workers it runs
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(
            update={"num_workers": resources.resolve_num_workers(cfg, nodes, use_gpu)})})
        _check_batch(cfg, len(arrays["x_train"]))
    resources.check_resources(cfg, nodes, workers=cfg.ray.num_workers, use_gpu=use_gpu, key="ray.num_workers")
    clock.lap("ray_start_s")  # with loading the arrays and the batch and resource checks
    cluster.check_shared(uri, storage, nodes)
    inputs = cluster.put_inputs(dataset, root, arrays)
    clock.lap("data_handoff_s")  # with the shared-storage probe

    run = driver.open_run(cfg, dataset, root, stage=stage, storage=storage, uri=uri, use_gpu=use_gpu, fresh=fresh)
    if run.resumed:
        print(f"{stage}: resuming the interrupted MLflow run {run.run_id} from its last checkpoint in "
              f"{storage}/{run.ray_run_name}")
    else:
        print(f"{stage}: MLflow run {run.run_id} ({tracking.run_name(cfg)}) in {uri}")
    clock.lap("mlflow_run_s")
    with driver.ending(cfg, run, storage, stage) as outcome:
        fit_called = time.time()
        result = fit(cfg, dataset, storage=storage, inputs=inputs, use_gpu=use_gpu, mlflow_run_id=run.run_id,
                     tracking_uri=uri, ray_run_name=run.ray_run_name, callbacks=[checkpoint_callback()],
                     estimate={"stage": stage, "runs": len(cfg.data.datasets)})
        status = read_status(result)
        if status["status"] == "failed":
            raise RuntimeError(status["reason"])
        clock.lap("fit_s")
        summary = _write_dvc_outputs(cfg, dataset, root, result, status, run.run_id)
        clock.lap("dvc_outputs_s")
        _log_final_artifacts(run.client, run.run_id, cfg, dataset, root)
        clock.lap("export_and_register_s")
        _write_timings(dataset, root, clock.laps, status.get("timings"), fit_called)
        outcome.update(status=status["status"], reason=status.get("reason", ""))
    if status["status"] == "diverged":
        raise TrainingDiverged(f"run {run.run_id} diverged: {status['reason']}")
    return summary


def _check_batch(cfg: Config, train_images: int) -> None:
    resources.check_batch(cfg.train.batch_size, cfg.ray.num_workers, train_images,
                        per_worker=cfg.train.batch_scaling == "per_worker")


def _write_timings(dataset: str, root: Path, laps: dict, worker: dict | None, fit_called: float) -> None:
    """The end-of-run report's ``timings``: where the stage's seconds went, fit() split by rank 0's figures."""
    timings = dict(laps)
    if worker:  # absent when a resumed run had nothing left to train
        timings["worker_group_start_s"] = worker["worker_entered"] - fit_called
        timings.update({key: worker[key] for key in ("setup_s", "train_s", "eval_and_logging_s", "checkpoints_s")})
        timings["fit_other_s"] = laps["fit_s"] - sum(timings[key] for key in (
            "worker_group_start_s", "setup_s", "train_s", "eval_and_logging_s", "checkpoints_s"))
    report = output_paths(dataset, root)["report"]
    summary = json.loads(report.read_text())
    summary["timings"] = {key: round(value, 3) for key, value in timings.items()}
    report.write_text(json.dumps(summary, indent=2) + "\n")


class TrainingDiverged(RuntimeError):
    """The run hit a NaN/inf loss; MLflow marks it FAILED with the reason."""


def _write_dvc_outputs(cfg: Config, dataset: str, root: Path, result, status: dict, run_id: str) -> dict:
    paths = output_paths(dataset, root)
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as folder:
        folder = Path(folder)
        shutil.copy(folder / "generator.pt", paths["generator"])
        shutil.copy(folder / "rank0.pt", paths["checkpoint"])
        for name in ("losses", "quality", "samples"):
            shutil.copy(folder / f"{name}{paths[name].suffix}", paths[name])
    keys = ("fid", "kid", "inception_score", "class_coverage", "class_kl", "precision", "recall", "density", "coverage",
            "cond_accuracy", "precision_within_class", "recall_within_class", "density_within_class",
            "coverage_within_class", "mean", "std", "wasserstein", "loss_d", "loss_g", "images_per_sec", "wall_seconds",
            "epoch", "step", "status", "cuda_graph", "graph_fallback_reason", "peak_memory_gib")
    summary = {k: status[k] for k in keys if k in status}
    summary["mlflow_run_id"] = run_id
    paths["report"].write_text(json.dumps(summary, indent=2, default=float) + "\n")
    # `dvc metrics show` must fit 200 columns: recall speaks for variety; KID and class coverage stay in the report.
    comparable = ("fid", "inception_score", "recall", "cond_accuracy", "mean", "std", "wasserstein",
                  "images_per_sec", "mlflow_run_id")
    tracking.write_dvc_metrics(paths["metrics"], {k: summary[k] for k in comparable if k in summary})
    return summary


def _log_final_artifacts(client, run_id: str, cfg: Config, dataset: str, root: Path) -> None:
    """The checkpoint, the real-data reference picture and the generator as a registered model."""
    paths = output_paths(dataset, root)
    client.log_artifact(run_id, str(paths["checkpoint"]), artifact_path="checkpoint")
    real_png = root / processed_paths(dataset)["png"]
    if real_png.exists():
        client.log_artifact(run_id, str(real_png), artifact_path="reference")
    # map_location: rank 0 saved CUDA tensors when it trained on a GPU; the model is exported from the CPU.
    record = torch.load(paths["generator"], weights_only=True, map_location="cpu")
    generator, _ = build_generator_and_discriminator(ModelConfig(**record["model"]), dataset)
    generator.load_state_dict(record["state_dict"])
    latent_dim = record["model"]["latent_dim"]
    tracking.log_generator(client, run_id, generator.eval(), latent_dim,
                           f"ganpipe-{dataset}-generator" if cfg.mlflow.register_model else None,
                           metadata={"noise": record["noise"], "latent_dim": latent_dim, "dataset": dataset,
                                     "conditional": record["model"]["conditional"]})
