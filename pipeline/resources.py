"""What a run asks of the cluster and whether the cluster can ever hold it, decided before anything is placed.

Ray would wait for a request it cannot place (Train V2: 60 s per worker-group attempt, then retries): these
checks compare the request with what the nodes hold and stop with one line naming the key to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import Config, ConfigError

# An ASHA/FIFO trial only waits on its TorchTrainer, whose workers hold the CPUs/GPUs;
# Tune needs some resource for the trial itself, so it takes this share of a CPU.
TRIAL_CPU_SHARE = 0.01


class ClusterError(ConfigError):
    """A cluster setting that cannot work; one line naming the key and the fix."""


@dataclass(frozen=True)
class Node:
    node_id: str
    address: str
    resources: dict[str, float]

    def __str__(self) -> str:
        return f"{self.address} ({self.node_id[:8]})"


def worker_resources(use_gpu: bool) -> dict[str, float]:
    """What one Ray Train worker asks for: one whole GPU (NCCL cannot share one), else one CPU."""
    return {"GPU": 1.0} if use_gpu else {"CPU": 1.0}


def _take(free: dict[str, float], need: dict[str, float]) -> bool:
    if any(free.get(key, 0.0) + 1e-9 < amount for key, amount in need.items()):
        return False
    for key, amount in need.items():
        free[key] = free.get(key, 0.0) - amount
    return True


def _place(free: list[dict], workers: int, worker: dict, trial: dict | None) -> bool:
    """Place one trial's share (on the node that leaves most room) and its workers, or change nothing."""
    for node in (range(len(free)) if trial else [None]):
        attempt = [dict(resources) for resources in free]
        if node is not None and not _take(attempt[node], trial):
            continue
        placed = 0
        for resources in attempt:
            while placed < workers and _take(resources, worker):
                placed += 1
        if placed == workers:
            free[:] = attempt
            return True
    return False


def concurrent_capacity(nodes: list[Node], workers: int, worker: dict, trial: dict | None = None,
                        limit: int = 1) -> int:
    """How many runs (a trial's own share plus ``workers`` workers each) fit at once, up to ``limit``."""
    free = [dict(node.resources) for node in nodes]
    count = 0
    while count < limit and _place(free, workers, worker, trial):
        count += 1
    return count


def _amounts(resources: dict[str, float]) -> str:
    return " + ".join(f"{amount:g} {key}" for key, amount in resources.items() if amount) or "nothing"


def _describe(nodes: list[Node]) -> str:
    return "; ".join(f"{node} {_amounts({k: node.resources.get(k, 0) for k in ('CPU', 'GPU')})}" for node in nodes)


def check_resources(cfg: Config, nodes: list[Node], *, workers: int, use_gpu: bool, key: str,
                    trial: dict | None = None, trials: int = 1) -> int:
    """How many runs may go at once (at most ``trials``); stops when not even one can ever be placed.

    A run is ``workers`` Ray Train workers, plus ``trial`` (a Tune trial's own
    share) when it runs inside a sweep. Ray would wait for an impossible request
    (Train V2: 60 s per worker-group attempt, then retries), so compare it with
    what the nodes hold. An autoscaling cluster may still grow: there, wait as Ray does.
    """
    worker = worker_resources(use_gpu)
    if cfg.ray.autoscale:
        print(f"ray.autoscale: true: waiting for the cluster to provide {workers} x ({_amounts(worker)}) as needed")
        return trials
    fits = concurrent_capacity(nodes, workers, worker, trial, limit=trials)
    if trial and 0 < trial.get("GPU", 0) < 1:
        print(gpu_sharing(nodes, trial, fits, trials))
    if fits == 0:
        parts = [f"{workers} worker(s) of {_amounts(worker)}"] if workers else []
        parts += [f"the Tune trial's own {_amounts(trial)}"] if trial else []
        request = " plus ".join(parts)
        raise ClusterError(
            f"params.yaml: {key}: a run needs {request} on the cluster's nodes, which can never hold it "
            f"(nodes: {_describe(nodes)}): lower {key}{', set ray.use_gpu: false' if use_gpu else ''}, add nodes, "
            "or set ray.autoscale: true on an autoscaling cluster")
    return fits


def gpu_sharing(nodes: list[Node], trial: dict[str, float], fits: int, limit: int) -> str:
    """How many trials sharing GPUs run at once, and what bounds it: e.g. 2 GPUs x 4 trials per GPU = 8."""
    gpus = sum(node.resources.get("GPU", 0) for node in nodes)
    per_gpu = round(1 / trial["GPU"])
    capacity = concurrent_capacity(nodes, 0, {}, trial, limit=math.ceil(gpus * per_gpu) + 1)
    line = (f"sweep.trials_per_gpu = {per_gpu}: {gpus:g} GPU(s) x {per_gpu} = {gpus * per_gpu:g} trial slots; "
            f"the cluster holds {capacity} trial(s) at once")
    if capacity < gpus * per_gpu:
        line += f" (each trial also takes {_amounts({k: v for k, v in trial.items() if k != 'GPU'})})"
    if fits < capacity:
        line += f"; sweep.max_concurrent_trials = {limit} runs {fits}"
    return line


def check_batch(batch_size: int, workers: int, train_images: int, *, batch_key: str = "train.batch_size",
                workers_key: str = "ray.num_workers", per_worker: bool = False) -> None:
    """The global batch splits evenly over the workers (unless it is ``per_worker``), and a worker's batch fits
    in its shard."""
    if not per_worker and (batch_size < workers or batch_size % workers):
        nearest = sorted({workers * max(1, batch_size // workers), workers * math.ceil(batch_size / workers)})
        raise ClusterError(
            f"params.yaml: {batch_key} = {batch_size} cannot be split evenly over {workers_key} = {workers}: "
            f"each worker trains on {batch_key} / {workers_key} samples per step; use a multiple of {workers} "
            f"(e.g. {' or '.join(map(str, nearest))})")
    worker_batch, shard = batch_size if per_worker else batch_size // workers, train_images // workers
    if worker_batch > shard:
        raise ClusterError(
            f"params.yaml: {batch_key} = {batch_size} gives each of the {workers} workers {worker_batch} samples per "
            f"step, more than its shard of {shard} training images ({train_images} / {workers}): lower "
            f"{batch_key} or {workers_key}")


def resolve_num_workers(cfg: Config, nodes: list[Node], use_gpu: bool) -> int:
    """ray.num_workers, with auto made a number and said once: one worker per GPU the cluster holds (at most
    ray.max_workers, and with batch_scaling split, a count that divides the batch), or one on CPUs, which ran
    fastest there (docs/gpu.md)."""
    if cfg.ray.num_workers != "auto":
        return cfg.ray.num_workers
    gpus = int(sum(node.resources.get("GPU", 0) for node in nodes) + 1e-9)
    cap = cfg.ray.max_workers or gpus
    workers = max(1, min(gpus, cap)) if use_gpu else 1
    while cfg.train.batch_scaling == "split" and cfg.train.batch_size % workers:
        workers -= 1  # the global batch is split evenly
    seen = f"the cluster holds {_amounts(_totals(nodes))}"
    why = (f"one per GPU{f', at most ray.max_workers = {cfg.ray.max_workers}' if cfg.ray.max_workers else ''}"
           f"{f', dividing train.batch_size = {cfg.train.batch_size}' if workers < min(gpus, cap) else ''}"
           if use_gpu else "one on CPUs, the fastest measured there")
    print(f"ray.num_workers: auto: {workers} worker(s), {why} ({seen})")
    return workers


def _totals(nodes: list[Node]) -> dict[str, float]:
    return {key: sum(node.resources.get(key, 0) for node in nodes) for key in ("CPU", "GPU")}


def resolve_use_gpu(setting: bool | str, nodes: list[Node]) -> bool:
    """ray.use_gpu: auto means GPUs if the cluster has any (the head itself may have none)."""
    if setting == "auto":
        return any(node.resources.get("GPU", 0) > 0 for node in nodes)
    return bool(setting)
