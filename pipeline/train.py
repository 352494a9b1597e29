"""train@<dataset>: data-parallel GAN training on Ray Train, tracked in MLflow and DVC.

Driver (``run``): creates the MLflow run, fits a ``TorchTrainer`` and turns the
final checkpoint into the DVC outputs (models/, metrics/, plots/).

Before the run is created, ``pipeline.cluster`` joins Ray and checks the
cluster (batch split, resources, shared storage_path, a reachable MLflow), then
puts the processed arrays and the evaluator in Ray's object store: workers read
nothing from the head's disk.

Workers (``train_loop``): each holds only its shard of the data on its device,
trains with the engine in ``gan/``, and every ``checkpoint_every`` epochs reports
a checkpoint to ``ray.storage_path``. Rank 0 evaluates quality and logs to MLflow.
A killed worker makes Ray restart the group (``ray.max_failures``); it resumes
from the last checkpoint and keeps logging into the same MLflow run. A killed
driver is survived too: the Ray run is named after the run's identity
(``pipeline.resume``), so running the stage again finds the interrupted run's
checkpoints in ``ray.storage_path`` and its MLflow run, and continues both.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient

from gan.data import DATASETS, DeviceBatches
from gan.engine import DivergedError, EngineConfig, GANTrainer
from gan.images import density_plot, image_grid, save_png
from gan.metrics import evaluate
from gan.models import build_models
from pipeline import cluster, resume, tracking
from pipeline.config import Config, ModelConfig, params_hash, validate
from pipeline.progress import EpochBar, checkpoint_callback, on_terminal
from pipeline.preprocess import load_processed, processed_paths

# MLflow metric keys, grouped by prefix so the UI charts them together.
STEP_METRICS = {"loss_d": "loss/d", "loss_g": "loss/g", "d_real": "d/real", "d_fake": "d/fake",
                "d_acc": "d/acc", "grad_norm_d": "grad/d", "grad_norm_g": "grad/g"}
STATUS_FILE = "status.json"


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


def build_generator_and_discriminator(m: ModelConfig, dataset: str):
    """params.yaml's model section, built for the dataset's sample shape."""
    return build_models(m.name, shape=DATASETS[dataset].shape, latent_dim=m.latent_dim, hidden=tuple(m.hidden),
                        channels=m.channels, dropout=m.dropout, activation=m.activation,
                        spectral_norm=m.spectral_norm)


def _mean_over_workers(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def toy_quality(samples: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    from scipy.stats import wasserstein_distance

    fake = samples.detach().double().flatten().cpu().numpy()
    return {"mean": float(fake.mean()), "std": float(fake.std()),
            "wasserstein": float(wasserstein_distance(fake, real.double().flatten().cpu().numpy()))}


@dataclass
class History:
    """The curves DVC plots draw: rows per log read-back and per epoch."""

    losses: list[dict] = field(default_factory=list)
    quality: list[dict] = field(default_factory=list)

    def save(self, folder: Path) -> None:
        pd.DataFrame(self.losses).to_csv(folder / "losses.csv", index=False)
        pd.DataFrame(self.quality).to_csv(folder / "quality.csv", index=False)

    @classmethod
    def load(cls, folder: Path) -> "History":
        return cls(losses=_rows(folder / "losses.csv"), quality=_rows(folder / "quality.csv"))


def _rows(csv: Path) -> list[dict]:
    """A CSV's rows; a run that diverged in its first epoch leaves an empty file."""
    return pd.read_csv(csv).to_dict("records") if csv.stat().st_size > 1 else []


class RayTrainSession:
    """A Ray Train worker's view: its rank, device, DDP wrapping, reports and checkpoints."""

    def __init__(self, use_gpu: bool):
        import ray.train
        import ray.train.torch

        # Ray Train logs every report in full at INFO; rank 0's epoch line says what matters.
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        if self.world > 1 and self.device.type == "cuda":
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        # broadcast_buffers=False: D runs one forward on cat([real, fake]) per update and
        # buffer broadcasts between forwards break BatchNorm under DDP (pytorch #175024).
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"broadcast_buffers": False})

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict, folder: Path | None = None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)


def train_loop(loop_config: dict, session=None) -> None:
    """Runs on every Ray Train worker, or in a Tune trial with a single-process session."""
    session = session or RayTrainSession(loop_config["use_gpu"])
    cfg = validate(loop_config["params"])
    dataset = loop_config["dataset"]
    rank, world, device = session.rank, session.world, session.device

    # Same seed everywhere for equal initial weights; per-rank seeds for noise and shuffling.
    torch.manual_seed(cfg.train.seed)
    generator, discriminator = map(session.prepare, build_generator_and_discriminator(cfg.model, dataset))
    batches = DeviceBatches(cluster.worker_shard(loop_config["inputs"], rank, world).to(device),
                            cfg.train.batch_size // world,
                            seed=cfg.train.seed + rank)
    trainer = GANTrainer(generator, discriminator, EngineConfig.from_mapping(cfg.train.model_dump()), device=device,
                         seed=cfg.train.seed + 1000 * (rank + 1), metric_reducer=_mean_over_workers)

    start_epoch, history = 1, History()
    checkpoint = session.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            folder = Path(folder)
            state = torch.load(folder / f"rank{rank}.pt", weights_only=True, map_location="cpu")
            trainer.load_state_dict(state["trainer"])
            batches.load_state_dict(state["batches"])
            start_epoch = state["epoch"] + 1
            if rank == 0:
                history = History.load(folder)
                print(f"resumed from the checkpoint of epoch {state['epoch']}", flush=True)

    logger = _RankZeroLogger(loop_config, cfg, dataset, device) if rank == 0 else None
    if logger and start_epoch > 1:
        logger.client.set_tag(logger.run_id, resume.TAG_RESUMED, str(start_epoch - 1))
    if start_epoch > cfg.train.epochs:  # the driver died after the last checkpoint: report it again
        session.report(state["metrics"], folder=None)
        return
    started = time.perf_counter()
    status, reason, quality = "completed", "", {}
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        bar = None  # rank 0's bar on the driver's terminal, fed by the engine's read-backs
        if logger and loop_config.get("progress"):
            bar = EpochBar(epoch, cfg.train.epochs, iterations=len(batches) // cfg.train.d_steps,
                           images_per_iteration=batches.batch_size * world * cfg.train.d_steps,
                           first_step=trainer.step)
        try:
            result = trainer.train_epoch(batches, on_read=bar.on_read if bar else None)
        except DivergedError as err:
            status, reason = "diverged", str(err)
        else:
            if trainer.stopped_early:
                status = "stopped_early"
        finally:
            if bar:
                bar.close()
        metrics = {"epoch": epoch, "step": trainer.step, "status": status}
        if status == "diverged":
            metrics.update(loop_config.get("diverged_metrics", {}))  # e.g. fid=inf, so schedulers rank it last
        else:
            metrics.update(result.metrics, images_per_sec=result.images_per_sec * world)
            if logger:
                quality = logger.epoch_end(trainer, result, epoch, history, world)
            metrics.update(quality)
        last = status != "completed" or epoch == cfg.train.epochs
        if last or epoch % cfg.train.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as folder:
                folder = Path(folder)
                torch.save({"trainer": trainer.state_dict(), "batches": batches.state_dict(), "epoch": epoch,
                            "metrics": metrics}, folder / f"rank{rank}.pt")
                if logger:
                    history.save(folder)
                    logger.write_outputs(trainer, folder, {**metrics, "reason": reason,
                                                           "wall_seconds": time.perf_counter() - started})
                session.report(metrics, folder)
        else:
            session.report(metrics)
        if last:
            break


class _RankZeroLogger:
    """Everything only rank 0 does: quality evaluation, MLflow logging, output files."""

    def __init__(self, loop_config: dict, cfg: Config, dataset: str, device: torch.device):
        from mlflow.tracking import MlflowClient

        self.cfg, self.dataset, self.device = cfg, dataset, device
        self.toy = DATASETS[dataset].kind == "toy"
        self.client = MlflowClient(loop_config["tracking_uri"])
        self.run_id = loop_config["mlflow_run_id"]
        self.evaluator, self.reference = cluster.worker_reference(loop_config["inputs"], dataset, device)
        self.eval_samples = cfg.train.eval_samples

    def epoch_end(self, trainer: GANTrainer, result, epoch: int, history: History, world: int) -> dict:
        for row in result.history:
            values = {STEP_METRICS[k]: v for k, v in row.items() if k in STEP_METRICS}
            tracking.log_metrics(self.client, self.run_id, values, step=row["step"])
            history.losses.append({"epoch": epoch, **row})
        if self.toy:
            quality = toy_quality(trainer.sample(self.eval_samples), self.reference)
        else:
            quality = evaluate(trainer.sample, self.evaluator, self.reference, n=self.cfg.train.eval_samples,
                               device=self.device)
        quality = {k: float(v) for k, v in quality.items()}
        speed = result.images_per_sec * world
        # What the engine really runs with: the optimizers' current lrs and exact update counts.
        engine_state = {"opt/lr_g": trainer.opt_g.param_groups[0]["lr"], "opt/lr_d": trainer.opt_d.param_groups[0]["lr"],
                        "opt/d_updates": trainer.d_updates, "opt/g_updates": trainer.g_updates}
        tracking.log_metrics(self.client, self.run_id,
                             {**{f"quality/{k}": v for k, v in quality.items()}, "speed/img_per_s": speed,
                              "epoch": epoch, **engine_state}, step=epoch)
        # The headline figure last: DVC's quality plot draws the last column.
        main_key = "wasserstein" if self.toy else "fid"
        history.quality.append({"epoch": epoch, "step": trainer.step, "images_per_sec": speed,
                                **{k: v for k, v in quality.items() if k != main_key}, main_key: quality[main_key]})
        picture = self.picture(trainer)
        self.client.log_image(self.run_id, picture, key="samples", step=epoch)
        headline = (f"fid {quality['fid']:.3f}" if not self.toy else
                    f"mean {quality['mean']:.3f} std {quality['std']:.3f}")
        print(f"epoch {epoch}/{self.cfg.train.epochs}  {speed:,.0f} img/s  loss_d {result.metrics['loss_d']:.4f}  "
              f"loss_g {result.metrics['loss_g']:.4f}  {headline}", flush=True)
        return quality

    def picture(self, trainer: GANTrainer) -> np.ndarray:
        if self.toy:
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "density.png"
                density_plot(self.reference.cpu().numpy(), trainer.sample(self.eval_samples).cpu().numpy(), path)
                from PIL import Image

                return np.asarray(Image.open(path).convert("RGB"))
        return image_grid(trainer.sample(64, noise=trainer.fixed_noise), nrow=8)

    def write_outputs(self, trainer: GANTrainer, folder: Path, status: dict) -> None:
        torch.save({"state_dict": trainer.sampling_generator.state_dict(), "model": self.cfg.model.model_dump(),
                    "dataset": self.dataset}, folder / "generator.pt")
        save_png(self.picture(trainer), folder / "samples.png")
        (folder / STATUS_FILE).write_text(json.dumps(status, default=float))


def make_loop_config(cfg: Config, dataset: str, *, inputs: dict, mlflow_run_id: str, tracking_uri: str,
                     use_gpu: bool, diverged_metrics: dict | None = None, progress: bool = False) -> dict:
    """What every worker needs: plain values and object-store references (``cluster.put_inputs``)."""
    return {"params": cfg.model_dump(mode="json"), "dataset": dataset, "inputs": inputs,
            "mlflow_run_id": mlflow_run_id, "tracking_uri": tracking_uri, "use_gpu": use_gpu,
            "diverged_metrics": diverged_metrics or {}, "progress": progress}


def storage_path(cfg: Config, root: Path) -> str:
    """ray.storage_path made absolute (Ray workers chdir); URIs such as s3:// stay as they are."""
    if "://" in cfg.ray.storage_path:
        return cfg.ray.storage_path
    path = Path(cfg.ray.storage_path)
    return str(path if path.is_absolute() else (root / path).resolve())


def fit(cfg: Config, dataset: str, *, storage: str, inputs: dict, use_gpu: bool, mlflow_run_id: str,
        tracking_uri: str, ray_run_name: str, callbacks: list | None = None, diverged_metrics: dict | None = None):
    """One TorchTrainer fit; returns the Ray Result (its checkpoint holds rank 0's outputs).

    A run folder ``<storage>/<ray_run_name>`` left by an interrupted fit makes Ray
    resume from its latest checkpoint.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop,
        train_loop_config=make_loop_config(cfg, dataset, inputs=inputs, mlflow_run_id=mlflow_run_id,
                                           tracking_uri=tracking_uri, use_gpu=use_gpu,
                                           diverged_metrics=diverged_metrics,
                                           progress=on_terminal()),  # False inside a sweep's trial
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=cluster.worker_resources(use_gpu)),
        run_config=ray.train.RunConfig(
            name=ray_run_name, storage_path=storage, callbacks=callbacks,
            # A finite controller budget: a worker group that can never be placed ends the run
            # instead of retrying forever; an autoscaling cluster may take its time.
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.ray.max_failures,
                controller_failure_limit=-1 if cfg.ray.autoscale else cluster.CONTROLLER_FAILURE_LIMIT),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


def read_status(result) -> dict:
    if result.checkpoint is None:
        return {"status": "failed", "reason": str(result.error or "no checkpoint was reported")}
    with result.checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / STATUS_FILE).read_text())


def run(cfg: Config, dataset: str, root: Path = Path("."), fresh: bool = False) -> dict:
    """Train, or resume the interrupted run with the same identity (``fresh``: start over)."""
    root = root.resolve()
    stage = f"train@{dataset}"
    # Every check before the MLflow run exists: a bad setting leaves nothing RUNNING.
    arrays = load_processed(dataset, root)
    cluster.check_batch(cfg.train.batch_size, cfg.ray.num_workers, len(arrays["x_train"]))
    uri, storage = tracking.tracking_uri(cfg, root), storage_path(cfg, root)
    nodes = cluster.start(cfg)
    use_gpu = cluster.resolve_use_gpu(cfg.ray.use_gpu, nodes)
    cluster.check_resources(cfg, nodes, workers=cfg.ray.num_workers, use_gpu=use_gpu, key="ray.num_workers")
    cluster.check_shared(uri, storage, nodes)
    inputs = cluster.put_inputs(dataset, root, arrays)

    git = tracking.git_state(root)
    identity = resume.run_identity(cfg, stage=stage, dataset=dataset, use_gpu=use_gpu, git_commit=git["git.commit"])
    ray_run_name = f"train-{dataset}-{identity}"
    client = MlflowClient(uri)
    experiment_id = tracking.ensure_experiment(client, tracking.experiment_name(cfg, dataset), root)
    interrupted = resume.take_over(client, experiment_id, stage=stage, identity=identity, fresh=fresh)
    if interrupted:
        run_id = interrupted.info.run_id
        print(f"{stage}: resuming the interrupted MLflow run {run_id} from its last checkpoint in "
              f"{storage}/{ray_run_name}")
    else:
        resume.clear_storage(storage, ray_run_name)  # a finished run's checkpoints must not be resumed
        client, run_id = tracking.start_run(cfg, dataset, root, stage=stage, ray_run_name=ray_run_name,
                                            params_hash=params_hash(root / "params.yaml"), uri=uri, git=git,
                                            extra_tags={resume.TAG_IDENTITY: identity, **resume.driver_tags()})
        print(f"{stage}: MLflow run {run_id} ({tracking.run_name(cfg)}) in {uri}")
    try:
        with resume.Heartbeat(client, run_id):
            result = fit(cfg, dataset, storage=storage, inputs=inputs, use_gpu=use_gpu, mlflow_run_id=run_id,
                         tracking_uri=uri, ray_run_name=ray_run_name, callbacks=[checkpoint_callback()])
        status = read_status(result)
        if status["status"] == "failed":
            raise RuntimeError(status["reason"])
        summary = _write_dvc_outputs(cfg, dataset, root, result, status, run_id)
        _log_final_artifacts(client, run_id, cfg, dataset, root)
    except BaseException as err:
        tracking.end_run(client, run_id, "failed", f"{type(err).__name__}: {err}")
        raise
    tracking.end_run(client, run_id, status["status"], status.get("reason", ""))
    if status["status"] == "diverged":
        raise TrainingDiverged(f"run {run_id} diverged: {status['reason']}")
    return summary


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
    keys = ("fid", "kid", "inception_score", "class_coverage", "class_kl", "precision", "recall",
            "mean", "std", "wasserstein", "loss_d", "loss_g", "images_per_sec", "wall_seconds",
            "epoch", "step", "status")
    summary = {k: status[k] for k in keys if k in status}
    summary["mlflow_run_id"] = run_id
    paths["report"].write_text(json.dumps(summary, indent=2, default=float) + "\n")
    comparable = ("fid", "kid", "inception_score", "class_coverage", "mean", "std", "wasserstein",
                  "images_per_sec", "mlflow_run_id")
    tracking.write_dvc_metrics(paths["metrics"], {k: summary[k] for k in comparable if k in summary})
    return summary


def _log_final_artifacts(client, run_id: str, cfg: Config, dataset: str, root: Path) -> None:
    """The checkpoint, the real-data reference picture and the generator as a registered model."""
    import mlflow
    from mlflow.models import infer_signature

    paths = output_paths(dataset, root)
    client.log_artifact(run_id, str(paths["checkpoint"]), artifact_path="checkpoint")
    real_png = root / processed_paths(dataset)["png"]
    if real_png.exists():
        client.log_artifact(run_id, str(real_png), artifact_path="reference")
    generator, _ = build_generator_and_discriminator(cfg.model, dataset)
    generator.load_state_dict(torch.load(paths["generator"], weights_only=True)["state_dict"])
    generator.eval()
    noise = torch.randn(4, cfg.model.latent_dim)
    with torch.no_grad():
        signature = infer_signature(noise.numpy(), generator(noise).numpy())
    mlflow.set_tracking_uri(client.tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(
            generator, name="generator", input_example=noise.numpy(), signature=signature,
            registered_model_name=f"ganpipe-{dataset}-generator" if cfg.mlflow.register_model else None,
        )
