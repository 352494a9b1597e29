"""Ray for the training stages: join the cluster params.yaml names, check it, hand workers their inputs.

Rule of the cluster: nothing a Ray worker or Tune trial needs is read from the
head's disk. The driver (on the head, where DVC runs) loads the processed arrays
and the evaluator once and puts them in Ray's object store; the references travel
in the loop config, so every worker, every trial and every restarted worker group
gets them from Ray. Checkpoints travel through ``ray.storage_path``, metrics and
artifacts through MLflow.

Everything here runs before the MLflow run is created: a setting the cluster
cannot honour stops the stage with one line naming the key, and nothing is left
RUNNING.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from gan.data import DATASETS, shard
from pipeline.config import Config, ConfigError
from pipeline.yardstick import load_reference
from pipeline.tracking import probe_tracking_server, tracking_credentials

CONNECT_TIMEOUT_S = 60
PROBE_TIMEOUT_S = 60
# An ASHA/FIFO trial only waits on its TorchTrainer, whose workers hold the CPUs/GPUs;
# Tune needs some resource for the trial itself, so it takes this share of a CPU.
TRIAL_CPU_SHARE = 0.01
# Controller failures (e.g. a worker group that cannot be placed) a run may retry;
# Ray's default is unlimited, which turns an impossible request into a hang.
CONTROLLER_FAILURE_LIMIT = 3


class ClusterError(ConfigError):
    """A cluster setting that cannot work; one line naming the key and the fix."""


# --------------------------------------------------------------------------- connect


def connect(cfg: Config) -> None:
    """Start or join Ray as ``ray.address`` says, with its console noise down.

    null starts a fresh local Ray every time (``address="local"``): a plain
    ``ray.init()`` would join, or hang on, whatever cluster ``ray start`` left on
    this machine. Anything else joins an existing cluster, or fails within about
    a minute naming ``ray.address`` and what was tried.
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # the patch logs every print a second time
    if ray.is_initialized():
        return
    address = cfg.ray.address
    if address is None:
        try:
            import ray.dashboard.optional_deps  # noqa: F401 - what the dashboard imports
        except ImportError as err:  # include_dashboard=True would fail outright: run without it
            print(f"ray: no dashboard ({err}); Ray starts without it", flush=True)
            ray.init(address="local", logging_level="warning", include_dashboard=False)
            return
        # Ray Train's placement-group cleaner finds its cluster through the State API. With another Ray
        # instance on this machine its auto-detection fails, a stopped trial's worker group is never
        # removed, and the next trial waits for its CPUs forever: name this cluster's dashboard for
        # every process it starts.
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(address="local", logging_level="warning", include_dashboard=True, dashboard_port=port)
        return
    target = resolve_address(address)
    wait_for_port(address, target, CONNECT_TIMEOUT_S)
    try:
        ray.init(address=address, logging_level="warning")
    except Exception as err:  # Ray raises ConnectionError, RuntimeError or AuthenticationError here
        hint = " (is RAY_AUTH_TOKEN the cluster's token?)" if "auth" in str(err).lower() else ""
        raise ClusterError(f"params.yaml: ray.address = {address!r}: could not join the Ray cluster at "
                           f"{target[0]}:{target[1]}{hint}: {_first_line(err)}") from None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def resolve_address(address: str) -> tuple[str, int]:
    """(host, port) that ``address`` points at; ``auto`` reads RAY_ADDRESS or the last ``ray start``."""
    from ray._private.services import canonicalize_bootstrap_address

    where = address.split("://", 1)[1] if address.startswith("ray://") else address
    try:
        if address == "auto":
            where = canonicalize_bootstrap_address("auto")
            if where is None:
                raise ConnectionError("no running cluster found")
        host, _, port = where.rpartition(":")
        return host, int(port)
    except (ConnectionError, ValueError) as err:
        tried = ("RAY_ADDRESS and the address `ray start` records on this machine" if address == "auto"
                 else "host:port, auto or ray://host:port")
        raise ClusterError(f"params.yaml: ray.address = {address!r}: {_first_line(err)} (looked for: {tried}); "
                           "set ray.address: null to start a local Ray") from None


def wait_for_port(address: str, target: tuple[str, int], timeout_s: float) -> None:
    """Wait until something listens at ``target``, saying so at once; Ray itself would retry for minutes, silently."""
    deadline, said = time.monotonic() + timeout_s, False
    while True:
        try:
            socket.create_connection(target, timeout=5).close()
            return
        except OSError as err:
            if not said:
                print(f"ray.address = {address!r}: nothing answers at {target[0]}:{target[1]} yet; waiting up to "
                      f"{timeout_s:.0f} s for the Ray cluster", flush=True)
                said = True
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"params.yaml: ray.address = {address!r}: no Ray cluster answered at {target[0]}:{target[1]} "
                    f"within {timeout_s:.0f} s ({err.strerror or err}); start one with `ray start --head` "
                    "(docs/cluster.md) or set ray.address: null for a local Ray") from None
            time.sleep(1)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class Node:
    node_id: str
    address: str
    resources: dict[str, float]

    def __str__(self) -> str:
        return f"{self.address} ({self.node_id[:8]})"


def alive_nodes() -> list[Node]:
    import ray

    return [Node(n["NodeID"], n["NodeManagerAddress"], dict(n["Resources"])) for n in ray.nodes() if n["Alive"]]


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


def start(cfg: Config) -> list[Node]:
    """Connect as ``ray.address`` says; the cluster's live nodes."""
    connect(cfg)
    return alive_nodes()


def check_shared(tracking_uri: str, storage: str, nodes: list[Node]) -> None:
    """MLflow takes our credentials; on a multi-node cluster it must be a server every node reaches with
    them, and every node must share storage_path."""
    problem = probe_tracking_server(tracking_uri, tracking_credentials())
    if problem:
        raise ClusterError(f"MLflow at {tracking_uri} {problem}")
    check_tracking_store(tracking_uri, nodes)
    probe_nodes(storage, tracking_uri, nodes)


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


# --------------------------------------------------------------------------- probes


def check_tracking_store(uri: str, nodes: list[Node]) -> None:
    """A store on the head's disk cannot take rank 0's logging from another node."""
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    if len(nodes) > 1 and scheme in ("sqlite", "file"):
        raise ClusterError(
            f"params.yaml: mlflow.tracking_uri: {uri!r} is a store on this machine's disk, and rank 0 may run on any "
            f"of the cluster's {len(nodes)} nodes: start an MLflow server every node reaches (docs/cluster.md) "
            "and set mlflow.tracking_uri (or MLFLOW_TRACKING_URI) to its http:// URL")


def probe_nodes(storage: str, tracking_uri: str, nodes: list[Node]) -> None:
    """On a multi-node cluster, a tiny task on every node proves it shares storage_path and reaches MLflow.

    The driver writes a marker under storage_path; each node's task must read it
    and write its own, which the driver must then see.
    """
    if len(nodes) < 2:
        return
    import ray
    from pyarrow import fs as pafs
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    filesystem, base = pafs.FileSystem.from_uri(storage)
    folder = f"{base.rstrip('/')}/.ganpipe-probe-{uuid.uuid4().hex[:12]}"
    token = uuid.uuid4().hex
    filesystem.create_dir(folder, recursive=True)
    try:
        with filesystem.open_output_stream(f"{folder}/driver") as out:
            out.write(token.encode())
        probe = ray.remote(num_cpus=0, max_retries=0)(_probe_node)
        credentials = ray.put(tracking_credentials())  # not a runtime env: Ray's agent logs those in full
        pending = {node.node_id: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node.node_id, soft=False)).remote(storage, folder, token, tracking_uri, credentials) for node in nodes}
        ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=PROBE_TIMEOUT_S)
        for node in nodes:
            ref = pending[node.node_id]
            problem = ray.get(ref) if ref in ready else f"its probe task did not run within {PROBE_TIMEOUT_S} s"
            if not problem and filesystem.get_file_info(f"{folder}/{node.node_id}").type == pafs.FileType.NotFound:
                problem = "the driver cannot see what it wrote there"
            if problem.startswith("mlflow:"):
                problem = problem.removeprefix("mlflow: ")
                hint = ": use an address every node reaches" if problem.startswith("cannot be reached") else ""
                raise ClusterError(f"params.yaml: mlflow.tracking_uri = {tracking_uri!r}: the MLflow server, from the "
                                   f"node at {node}, {problem}{hint}")
            if problem:
                raise ClusterError(
                    f"params.yaml: ray.storage_path = {storage!r} is not shared: the node at {node}: {problem}; "
                    "every node must see one store: an NFS mount at the same path on every node, or s3://...")
    finally:
        filesystem.delete_dir(folder)


def _probe_node(storage: str, folder: str, token: str, tracking_uri: str, credentials: dict[str, str]) -> str:
    """Runs on one node: '' when it sees the driver's marker, wrote its own and reached MLflow."""
    import ray
    from pyarrow import fs as pafs

    try:
        filesystem, _ = pafs.FileSystem.from_uri(storage)
        with filesystem.open_input_stream(f"{folder}/driver") as marker:
            if marker.read().decode() != token:
                return "it sees another driver marker at the same path"
        node_id = ray.get_runtime_context().get_node_id()
        with filesystem.open_output_stream(f"{folder}/{node_id}") as out:
            out.write(b"ok")
    except OSError as err:
        return f"it cannot see the driver's marker ({_first_line(err)})"
    problem = probe_tracking_server(tracking_uri, credentials)
    return f"mlflow: {problem}" if problem else ""


# --------------------------------------------------------------------------- inputs


def put_inputs(dataset: str, root: Path, arrays: dict[str, np.ndarray]) -> dict:
    """The driver's inputs for every worker, as object-store references (read from disk once, here).

    ``x_train``: the processed training images; a node pulls them once and its
    workers share that copy, each keeping only its shard on its device.
    ``reference``: (evaluator network, real reference features) for rank 0's
    quality evaluation, computed once on the driver's CPU. ``credentials``: see ``use_credentials``.
    """
    import ray

    return {"x_train": ray.put(arrays["x_train"]), "y_train": ray.put(arrays["y_train"]),
            "reference": ray.put(load_reference(dataset, root, torch.device("cpu"), arrays)),
            "credentials": ray.put(tracking_credentials())}


def use_credentials(inputs: dict) -> None:
    """The driver's MLflow credentials (``tracking.CREDENTIAL_VARS``) in this worker's environment.

    They travel through the object store, not a runtime env: Ray's runtime-env agent
    writes a job's runtime env, variables and all, to its log.
    """
    import ray

    os.environ.update(ray.get(inputs["credentials"]))


def worker_shard(inputs: dict, rank: int, world: int, key: str = "x_train") -> torch.Tensor:
    """This rank's contiguous, equal-sized slice of the training images (or ``y_train``, their labels)."""
    import ray

    # A copy: object-store arrays are read-only, and the slice should not pin the whole array.
    return torch.from_numpy(np.array(shard(ray.get(inputs[key]), rank, world)))


def worker_reference(inputs: dict, dataset: str, device: torch.device):
    """(evaluator, reference) on ``device`` for rank 0."""
    import ray

    evaluator, reference = ray.get(inputs["reference"])
    if DATASETS[dataset].kind == "toy":
        return None, reference.to(device)
    # Arrays from the object store are read-only; torch warns when it wraps one, so the histogram is copied.
    return evaluator.to(device).eval(), replace(reference, features=reference.features.to(device),
                                                class_histogram=reference.class_histogram.copy())


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
