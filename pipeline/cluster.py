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

import os
import socket
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from gan.data import DATASETS, shard
from pipeline.config import Config
from pipeline.resources import ClusterError, Node
from pipeline.yardstick import load_reference
from pipeline.tracking import probe_tracking_server, tracking_credentials

CONNECT_TIMEOUT_S = 60
PROBE_TIMEOUT_S = 60
# Controller failures (e.g. a worker group that cannot be placed) a run may retry;
# Ray's default is unlimited, which turns an impossible request into a hang.
CONTROLLER_FAILURE_LIMIT = 3


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


def alive_nodes() -> list[Node]:
    import ray

    return [Node(n["NodeID"], n["NodeManagerAddress"], dict(n["Resources"])) for n in ray.nodes() if n["Alive"]]


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


