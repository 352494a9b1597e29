"""The training loop every stage that trains runs: Ray Train workers, and the fit that starts them.

Workers (``train_loop``): each holds only its shard of the data on its device,
trains with the engine in ``gan/``, and every ``checkpoint_every`` epochs reports
a checkpoint to ``ray.storage_path``. Rank 0 evaluates quality and logs to MLflow
(``pipeline.epoch_report``). A killed worker makes Ray restart the group
(``ray.max_failures``); it resumes from the last checkpoint and keeps logging
into the same MLflow run. The train stage fits it once; each sweep trial fits it
(or runs ``train_loop`` in its own process).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from gan.conditioning import conditioning_of
from gan.data import DeviceBatches
from gan.engine import DivergedError, EngineConfig, GANTrainer
from gan.parallel import GradientAllReduce
from pipeline import cluster, estimate, resources, resume, spool
from pipeline.config import Config
from pipeline.epoch_report import STATUS_FILE, History, RankZeroLogger
from pipeline.modeling import build_generator_and_discriminator
from pipeline.progress import EpochBar, on_terminal


def storage_path(cfg: Config, root: Path) -> str:
    """ray.storage_path made absolute (Ray workers chdir); URIs such as s3:// stay as they are."""
    if "://" in cfg.ray.storage_path:
        return cfg.ray.storage_path
    path = Path(cfg.ray.storage_path)
    return str(path if path.is_absolute() else (root / path).resolve())


def _mean_over_workers(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


class RayTrainWorker:
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


@dataclass(frozen=True)
class LoopRun:
    """What every worker of one run needs, built once by the driver: settings and object-store references."""

    cfg: Config
    dataset: str
    inputs: dict  # ``cluster.put_inputs``: the data, the evaluator and the tracking credentials, in Ray's store
    mlflow_run_id: str
    tracking_uri: str
    spool_root: str
    use_gpu: bool
    diverged_metrics: dict = field(default_factory=dict)  # what a diverged epoch reports (e.g. fid=inf)
    progress: bool = False  # rank 0 draws a progress bar (on a terminal, outside a sweep)
    estimate: dict | None = None  # how to say how long the run will take (``pipeline.estimate``)


def train_loop(config: dict) -> None:
    """Ray Train's entry on every worker: ``config`` is ``{"run": LoopRun}``."""
    run = config["run"]
    run_loop(run, RayTrainWorker(run.use_gpu))


def run_loop(run: LoopRun, worker) -> None:
    """One worker's training: on a Ray Train worker, or in a Tune trial that trains in its own process."""
    entered = time.time()  # wall clock: the driver compares it with when it called fit()
    cfg, dataset = run.cfg, run.dataset
    rank, world, device = worker.rank, worker.world, worker.device

    # Same seed everywhere for equal initial weights; per-rank seeds for noise and shuffling.
    torch.manual_seed(cfg.train.seed)
    generator, discriminator = map(worker.prepare, build_generator_and_discriminator(cfg.model, dataset))
    # Several workers average their gradients in the engine; rank 0's initial weights go everywhere, as DDP did.
    gradient_sync = GradientAllReduce.broadcasting(generator, discriminator) if world > 1 else None
    labelled = conditioning_of(generator).labelled  # the batches carry labels
    labels = cluster.worker_shard(run.inputs, rank, world, "y_train").to(device) if labelled else None
    batches = DeviceBatches(cluster.worker_shard(run.inputs, rank, world).to(device),
                            cfg.train.worker_batch(world),
                            seed=cfg.train.seed + rank, labels=labels)
    trainer = GANTrainer(generator, discriminator, EngineConfig.from_mapping(cfg.train.model_dump()), device=device,
                         seed=cfg.train.seed + 1000 * (rank + 1), metric_reducer=_mean_over_workers,
                         gradient_sync=gradient_sync)
    try:
        _train_epochs(run, worker, trainer, batches, entered)
    finally:
        if trainer.graph is not None:
            trainer.graph.reset()  # before Ray destroys the process group (NCCL 2.26+ hangs otherwise)


def _train_epochs(run: LoopRun, worker, trainer: GANTrainer, batches: DeviceBatches, entered: float) -> None:
    cfg, dataset = run.cfg, run.dataset
    rank, world, device = worker.rank, worker.world, worker.device

    start_epoch, history = 1, History()
    checkpoint = worker.get_checkpoint()
    if checkpoint:
        with resume.readable_checkpoint(checkpoint, rank) as (state, folder):  # the one before, if cut short
            trainer.load_state_dict(state["trainer"])
            batches.load_state_dict(state["batches"])
            start_epoch = state["epoch"] + 1
            if rank == 0:
                history = History.load(folder)
                print(f"resumed from the checkpoint of epoch {state['epoch']}", flush=True)

    if rank == 0:
        cluster.use_credentials(run.inputs)
    logger = RankZeroLogger(run, device) if rank == 0 else None
    if logger and start_epoch > 1:
        logger.resumed(start_epoch - 1)
    if start_epoch > cfg.train.epochs:  # the driver died after the last checkpoint: report it again
        worker.report(state["metrics"], folder=None)
        return
    started = time.perf_counter()
    # Where a worker's time goes (rank 0's figures reach the end-of-run report): benchmarks/overhead.py reads them.
    timings = {"worker_entered": entered, "setup_s": time.time() - entered, "train_s": 0.0,
               "eval_and_logging_s": 0.0, "checkpoints_s": 0.0}
    status, reason, quality = "completed", "", {}
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        bar = None  # rank 0's bar on the driver's terminal, fed by the engine's read-backs
        iterations = len(batches) // cfg.train.d_steps
        if logger and run.progress:
            bar = EpochBar(epoch, cfg.train.epochs, iterations=iterations,
                           images_per_iteration=batches.batch_size * world * cfg.train.d_steps,
                           first_step=trainer.step)
        on_read = bar.on_read if bar else None
        if logger and epoch == start_epoch:  # on a CPU, say once how long the run will take
            on_read = estimate.hook(run.estimate, device, iterations, cfg.train.epochs - epoch + 1,
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
            metrics.update(run.diverged_metrics)  # e.g. fid=inf, so schedulers rank it last
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
                worker.report(metrics, folder)
        else:
            worker.report(metrics)
        timings["checkpoints_s"] += time.perf_counter() - reported
        if last:
            break


def _device_report(trainer: GANTrainer) -> dict:
    """Whether iterations ran as a CUDA graph (and why not, after a fallback), and rank 0's peak GPU memory."""
    cuda = trainer.device.type == "cuda"
    return {"cuda_graph": trainer.use_graph, "graph_fallback_reason": trainer.graph_fallback_reason,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(trainer.device) / 2**30, 3) if cuda else None}


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
        train_loop_config={"run": LoopRun(cfg, dataset, inputs=inputs, mlflow_run_id=mlflow_run_id,
                                          tracking_uri=tracking_uri, spool_root=str(spool.spool_root(storage)),
                                          use_gpu=use_gpu, diverged_metrics=diverged_metrics or {},
                                          estimate=estimate, progress=on_terminal())},  # False inside a sweep
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources.worker_resources(use_gpu)),
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
