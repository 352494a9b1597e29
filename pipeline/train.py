"""train@<dataset>: data-parallel GAN training on Ray Train, tracked in MLflow and DVC.

Driver (``run``): creates the MLflow run, fits a ``TorchTrainer`` and turns the
final checkpoint into the DVC outputs (models/, metrics/, plots/).

Before the run is created, ``pipeline.cluster`` joins Ray and checks the
cluster (batch split, resources, shared storage_path, a reachable MLflow), then
puts the processed arrays and the evaluator in Ray's object store: workers read
nothing from the head's disk.

Workers (``train_loop``): each holds only its shard of the data on its device,
trains with the engine in ``gan/``, and every ``checkpoint_every`` epochs reports
a checkpoint to ``ray.storage_path``. Rank 0 evaluates quality and logs to MLflow
(``pipeline.epoch_report``).
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
from pathlib import Path

import torch
import torch.distributed as dist

from gan.data import DATASETS, DeviceBatches
from gan.engine import DivergedError, EngineConfig, GANTrainer
from gan.models import build_models
from gan.parallel import GradientAllReduce
from pipeline import cluster, estimate, resume, spool, tracking
from pipeline.config import Config, ModelConfig, params_hash, validate
from pipeline.epoch_report import STATUS_FILE, History, RankZeroLogger
from pipeline.progress import EpochBar, Stopwatch, checkpoint_callback, on_terminal
from pipeline.preprocess import load_processed, processed_paths


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
                        spectral_norm=m.spectral_norm, conditional=m.conditional,
                        num_classes=len(DATASETS[dataset].classes), label_embedding=m.label_embedding)


def _mean_over_workers(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


class RayTrainSession:
    """A Ray Train worker's view: its rank, device, DDP wrapping, reports and checkpoints."""

    def __init__(self, use_gpu: bool):
        import ray.train
        import ray.train.torch
        from ray.train.v2._internal.execution import context as train_context

        # Ray Train logs every report in full at INFO, once per rank; rank 0's epoch line says what matters.
        # The report's logger is named after its file, outside the "ray.train" tree.
        for name in ("ray.train", train_context.__file__):
            logging.getLogger(name).setLevel(logging.WARNING)
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        # No DDP wrapper: the engine all-reduces gradients itself (gan.parallel), also inside its CUDA graph.
        if self.world > 1 and self.device.type == "cuda":
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return module.to(self.device)

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict, folder: Path | None = None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)


def train_loop(loop_config: dict, session=None) -> None:
    """Runs on every Ray Train worker, or in a Tune trial with a single-process session."""
    entered = time.time()  # wall clock: the driver compares it with when it called fit()
    session = session or RayTrainSession(loop_config["use_gpu"])
    cfg = validate(loop_config["params"])
    dataset = loop_config["dataset"]
    rank, world, device = session.rank, session.world, session.device

    # Same seed everywhere for equal initial weights; per-rank seeds for noise and shuffling.
    torch.manual_seed(cfg.train.seed)
    generator, discriminator = map(session.prepare, build_generator_and_discriminator(cfg.model, dataset))
    # Several workers average their gradients in the engine; rank 0's initial weights go everywhere, as DDP did.
    gradient_sync = GradientAllReduce.broadcasting(generator, discriminator) if world > 1 else None
    conditional = cfg.model.conditional != "none"  # the batches carry labels
    labels = cluster.worker_shard(loop_config["inputs"], rank, world, "y_train").to(device) if conditional else None
    batches = DeviceBatches(cluster.worker_shard(loop_config["inputs"], rank, world).to(device),
                            cfg.train.worker_batch(world),
                            seed=cfg.train.seed + rank, labels=labels)
    trainer = GANTrainer(generator, discriminator, EngineConfig.from_mapping(cfg.train.model_dump()), device=device,
                         seed=cfg.train.seed + 1000 * (rank + 1), metric_reducer=_mean_over_workers,
                         gradient_sync=gradient_sync)
    try:
        _train_epochs(loop_config, session, cfg, dataset, trainer, batches, entered)
    finally:
        if trainer.graph is not None:
            trainer.graph.reset()  # before Ray destroys the process group (NCCL 2.26+ hangs otherwise)


def _train_epochs(loop_config: dict, session, cfg: Config, dataset: str, trainer: GANTrainer,
                  batches: DeviceBatches, entered: float) -> None:
    rank, world, device = session.rank, session.world, session.device

    start_epoch, history = 1, History()
    checkpoint = session.get_checkpoint()
    if checkpoint:
        with resume.readable_checkpoint(checkpoint, rank) as (state, folder):  # the one before, if cut short
            trainer.load_state_dict(state["trainer"])
            batches.load_state_dict(state["batches"])
            start_epoch = state["epoch"] + 1
            if rank == 0:
                history = History.load(folder)
                print(f"resumed from the checkpoint of epoch {state['epoch']}", flush=True)

    if rank == 0:
        cluster.use_credentials(loop_config["inputs"])
    logger = RankZeroLogger(loop_config, cfg, dataset, device) if rank == 0 else None
    if logger and start_epoch > 1:
        logger.resumed(start_epoch - 1)
    if start_epoch > cfg.train.epochs:  # the driver died after the last checkpoint: report it again
        session.report(state["metrics"], folder=None)
        return
    started = time.perf_counter()
    # Where a worker's time goes (rank 0's figures reach the end-of-run report): benchmarks/overhead.py reads them.
    timings = {"worker_entered": entered, "setup_s": time.time() - entered, "train_s": 0.0,
               "eval_and_logging_s": 0.0, "checkpoints_s": 0.0}
    status, reason, quality = "completed", "", {}
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        bar = None  # rank 0's bar on the driver's terminal, fed by the engine's read-backs
        iterations = len(batches) // cfg.train.d_steps
        if logger and loop_config.get("progress"):
            bar = EpochBar(epoch, cfg.train.epochs, iterations=iterations,
                           images_per_iteration=batches.batch_size * world * cfg.train.d_steps,
                           first_step=trainer.step)
        on_read = bar.on_read if bar else None
        if logger and epoch == start_epoch:  # on a CPU, say once how long the run will take
            on_read = estimate.hook(loop_config.get("estimate"), device, iterations, cfg.train.epochs - epoch + 1,
                                    then=on_read)
        try:
            result = trainer.train_epoch(batches, on_read=on_read)
        except DivergedError as err:
            status, reason = "diverged", str(err)
        else:
            if trainer.stopped_early:
                status = "stopped_early"
        finally:
            if bar:
                bar.close()
        metrics = {"epoch": epoch, "step": trainer.step, "status": status, **_device_report(trainer)}
        if status == "diverged":
            metrics.update(loop_config.get("diverged_metrics", {}))  # e.g. fid=inf, so schedulers rank it last
        else:
            metrics.update(result.metrics, images_per_sec=result.images_per_sec * world)
            timings["train_s"] += result.seconds
            if logger:
                evaluated = time.perf_counter()
                quality = logger.epoch_end(trainer, result, epoch, history, world)
                timings["eval_and_logging_s"] += time.perf_counter() - evaluated
            metrics.update(quality)
        last = status != "completed" or epoch == cfg.train.epochs
        reported = time.perf_counter()
        if last or epoch % cfg.train.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as folder:
                folder = Path(folder)
                torch.save({"trainer": trainer.state_dict(), "batches": batches.state_dict(), "epoch": epoch,
                            "metrics": metrics, "sampling": trainer.sampling_settings(cfg.model.model_dump(), dataset)},
                           folder / f"rank{rank}.pt")
                if logger:
                    history.save(folder)
                    logger.write_outputs(trainer, folder, {**metrics, "reason": reason, "timings": timings,
                                                           "wall_seconds": time.perf_counter() - started})
                session.report(metrics, folder)
        else:
            session.report(metrics)
        timings["checkpoints_s"] += time.perf_counter() - reported
        if last:
            break


def _device_report(trainer: GANTrainer) -> dict:
    """Whether iterations ran as a CUDA graph (and why not, after a fallback), and rank 0's peak GPU memory."""
    cuda = trainer.device.type == "cuda"
    return {"cuda_graph": trainer.use_graph, "graph_fallback_reason": trainer.graph_fallback_reason,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(trainer.device) / 2**30, 3) if cuda else None}


def make_loop_config(cfg: Config, dataset: str, *, inputs: dict, mlflow_run_id: str, tracking_uri: str,
                     spool_root: str, use_gpu: bool, diverged_metrics: dict | None = None,
                     progress: bool = False, estimate: dict | None = None) -> dict:
    """What every worker needs: plain values and object-store references (``cluster.put_inputs``)."""
    return {"params": cfg.model_dump(mode="json"), "dataset": dataset, "inputs": inputs,
            "mlflow_run_id": mlflow_run_id, "tracking_uri": tracking_uri, "spool_root": spool_root,
            "use_gpu": use_gpu, "diverged_metrics": diverged_metrics or {}, "progress": progress,
            "estimate": estimate}


def storage_path(cfg: Config, root: Path) -> str:
    """ray.storage_path made absolute (Ray workers chdir); URIs such as s3:// stay as they are."""
    if "://" in cfg.ray.storage_path:
        return cfg.ray.storage_path
    path = Path(cfg.ray.storage_path)
    return str(path if path.is_absolute() else (root / path).resolve())


def fit(cfg: Config, dataset: str, *, storage: str, inputs: dict, use_gpu: bool, mlflow_run_id: str,
        tracking_uri: str, ray_run_name: str, callbacks: list | None = None, diverged_metrics: dict | None = None,
        estimate: dict | None = None):
    """One TorchTrainer fit; returns the Ray Result (its checkpoint holds rank 0's outputs).

    A run folder ``<storage>/<ray_run_name>`` left by an interrupted fit makes Ray
    resume from its latest checkpoint.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop,
        train_loop_config=make_loop_config(cfg, dataset, inputs=inputs, mlflow_run_id=mlflow_run_id,
                                           tracking_uri=tracking_uri, spool_root=str(spool.spool_root(storage)),
                                           use_gpu=use_gpu, diverged_metrics=diverged_metrics, estimate=estimate,
                                           progress=on_terminal()),  # False inside a sweep's trial
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=cluster.worker_resources(use_gpu)),
        run_config=ray.train.RunConfig(
            name=ray_run_name, storage_path=storage, callbacks=callbacks,
            # Ray Train turns NCCL async error handling on unless set: off for captured collectives (CUDA graphs notes).
            worker_runtime_env={"env_vars": {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}} if use_gpu else None,
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
    clock = Stopwatch()
    # Every check before the MLflow run exists: a bad setting leaves nothing RUNNING.
    arrays = load_processed(dataset, root)
    auto_workers = cfg.ray.num_workers == "auto"
    if not auto_workers:  # a fixed count is checked before Ray starts
        _check_batch(cfg, len(arrays["x_train"]))
    uri, storage = tracking.tracking_uri(cfg, root), storage_path(cfg, root)
    nodes = cluster.start(cfg)
    use_gpu = cluster.resolve_use_gpu(cfg.ray.use_gpu, nodes)
    if auto_workers:  # from here on, the run's config holds the number of workers it runs
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(
            update={"num_workers": cluster.resolve_num_workers(cfg, nodes, use_gpu)})})
        _check_batch(cfg, len(arrays["x_train"]))
    cluster.check_resources(cfg, nodes, workers=cfg.ray.num_workers, use_gpu=use_gpu, key="ray.num_workers")
    clock.lap("ray_start_s")  # with loading the arrays and the batch and resource checks
    cluster.check_shared(uri, storage, nodes)
    inputs = cluster.put_inputs(dataset, root, arrays)
    clock.lap("data_handoff_s")  # with the shared-storage probe

    git = tracking.git_state(root)
    data = resume.data_digest(root / processed_paths(dataset)["npz"])
    identity = resume.run_identity(cfg, stage=stage, dataset=dataset, data=data, use_gpu=use_gpu,
                                   git_commit=git["git.commit"])
    ray_run_name = f"train-{dataset}-{identity}"
    client = spool.SpooledClient(uri, spool.spool_root(storage))  # an outage from here on spools, never fails
    experiment_id = tracking.ensure_experiment(client, tracking.experiment_name(cfg, dataset), root)
    interrupted = resume.take_over(client, experiment_id, stage=stage, identity=identity, data=data, fresh=fresh)
    if interrupted:
        run_id = interrupted.info.run_id
        print(f"{stage}: resuming the interrupted MLflow run {run_id} from its last checkpoint in "
              f"{storage}/{ray_run_name}")
    else:
        resume.clear_storage(storage, ray_run_name)  # a finished run's checkpoints must not be resumed
        client, run_id = tracking.start_run(cfg, dataset, root, stage=stage, ray_run_name=ray_run_name,
                                            params_hash=params_hash(root / "params.yaml"), uri=uri, git=git,
                                            extra_tags={resume.TAG_IDENTITY: identity, resume.TAG_DATA: data,
                                                        **resume.driver_tags()},
                                            client=client)
        print(f"{stage}: MLflow run {run_id} ({tracking.run_name(cfg)}) in {uri}")
    clock.lap("mlflow_run_s")
    try:
        with resume.Heartbeat(client, run_id):
            fit_called = time.time()
            result = fit(cfg, dataset, storage=storage, inputs=inputs, use_gpu=use_gpu, mlflow_run_id=run_id,
                         tracking_uri=uri, ray_run_name=ray_run_name, callbacks=[checkpoint_callback()],
                         estimate={"stage": stage, "runs": len(cfg.data.datasets)})
        status = read_status(result)
        if status["status"] == "failed":
            raise RuntimeError(status["reason"])
        clock.lap("fit_s")
        summary = _write_dvc_outputs(cfg, dataset, root, result, status, run_id)
        clock.lap("dvc_outputs_s")
        _log_final_artifacts(client, run_id, cfg, dataset, root)
        clock.lap("export_and_register_s")
        _write_timings(dataset, root, clock.laps, status.get("timings"), fit_called)
    except BaseException as err:
        if not isinstance(err, spool.TrackerError):  # the server refuses this run: nothing more to tell it
            tracking.end_run(client, run_id, "failed", f"{type(err).__name__}: {err}")
        spool.settle(client, spool.spool_root(storage), cfg.mlflow.flush_timeout_s, stage)
        raise
    tracking.end_run(client, run_id, status["status"], status.get("reason", ""))
    spool.settle(client, spool.spool_root(storage), cfg.mlflow.flush_timeout_s, stage)
    if status["status"] == "diverged":
        raise TrainingDiverged(f"run {run_id} diverged: {status['reason']}")
    return summary


def _check_batch(cfg: Config, train_images: int) -> None:
    cluster.check_batch(cfg.train.batch_size, cfg.ray.num_workers, train_images,
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
