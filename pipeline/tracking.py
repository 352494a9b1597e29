"""MLflow glue: where the store is, how runs are named and tagged, what they log; and the DVC metric files.

The default store is SQLite inside the project, ``sqlite:///<root>/mlruns/mlflow.db``
(artifacts land beside it in mlruns/). ``mlflow.tracking_uri`` in params.yaml or the
MLFLOW_TRACKING_URI environment variable point at a server instead.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Metric, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from pipeline.config import Config, flatten
from pipeline.modeling import model_example
from pipeline.spool_records import TrackerError

TAG_STATUS = "ganpipe.status"            # completed | stopped_early | diverged | failed
TAG_FAILURE = "ganpipe.failure_reason"
# MLflow 3 marks what an experiment is for with this tag. Its UI (3.17) still opens in
# the GenAI view until the user picks "Model training", unless the URL asks for it.
TAG_EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
TRAINING_VIEW = "workflowType=machine_learning"
DEFAULT_EXPERIMENT_ID = "0"  # MLflow's own empty "Default"
TAG_DVC_EXPERIMENT = "dvc.exp_name"        # DVC_EXP_NAME, set by `dvc exp run`


def tracking_uri(cfg: Config, root: Path) -> str:
    """params.yaml's tracking_uri, else MLFLOW_TRACKING_URI, else the project's SQLite store."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    (root / "mlruns").mkdir(exist_ok=True)
    return f"sqlite:///{(root / 'mlruns' / 'mlflow.db').resolve()}"


# MLflow's credentials: they reach the workers through Ray's runtime env, never params.yaml or a log line.
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def tracking_credentials() -> dict[str, str]:
    """The MLflow credentials set in this environment."""
    return {key: os.environ[key] for key in CREDENTIAL_VARS if os.environ.get(key)}


PROBE_QUIET_S, PROBE_TIMEOUT_S = 5, 30  # the tracking server's first answer: said after 5 s, given up after 30


def probe_tracking_server(uri: str, credentials: dict[str, str]) -> str:
    """'' when the MLflow server at ``uri`` lets these credentials read experiments; else what is wrong,
    naming the environment variable to fix (never its value)."""
    if not uri.startswith(("http://", "https://")):
        return ""
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1")
    user, password, token = (credentials.get(key) for key in CREDENTIAL_VARS)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    elif user and password:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        try:
            urllib.request.urlopen(request, timeout=PROBE_QUIET_S).close()
        except OSError as err:
            if not isinstance(getattr(err, "reason", err), TimeoutError):
                raise
            # A server that does not answer at once is said to be waited for, then given a bounded time.
            print(f"MLflow at {uri} has not answered in {PROBE_QUIET_S} s; waiting up to {PROBE_TIMEOUT_S} s",
                  flush=True)
            urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S - PROBE_QUIET_S).close()
        return ""
    except urllib.error.HTTPError as err:
        if err.code == 401:
            if token:
                return "refused MLFLOW_TRACKING_TOKEN: set a valid token"
            if not user or not password:
                missing = " and ".join(key for key, value in zip(CREDENTIAL_VARS[:2], (user, password)) if not value)
                return f"asks for credentials and {missing} is not set in the environment"
            return "refused MLFLOW_TRACKING_PASSWORD for MLFLOW_TRACKING_USERNAME: set the user's password"
        if err.code == 403:
            return "lets MLFLOW_TRACKING_USERNAME in but not read experiments: grant the user READ or more"
        return f"answered HTTP {err.code} {err.reason}"
    except OSError as err:
        return f"cannot be reached ({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})"


def experiment_name(cfg: Config, dataset: str) -> str:
    return f"{cfg.mlflow.experiment_prefix}-{dataset}"


def run_name(cfg: Config) -> str:
    t = cfg.train
    conditional = "" if cfg.model.conditional == "none" else f"+{cfg.model.conditional}"  # dcgan+projection-...
    return f"{cfg.model.name}{conditional}-{t.loss}-d{t.d_steps}g{t.g_steps}"


def ensure_experiment(client: MlflowClient, name: str, root: Path) -> str:
    """The experiment's id, created if need be; marked as model training, also when an older version made it."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if TAG_EXPERIMENT_KIND not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND, TRAINING_KIND)
        return experiment.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:"):
        location = (root / "mlruns").resolve().as_uri()  # artifacts beside the DB, not in cwd
    return client.create_experiment(name, artifact_location=location, tags={TAG_EXPERIMENT_KIND: TRAINING_KIND})


def git_state(root: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"git.commit": commit or "unknown", "git.dirty": str(dirty).lower()}


def lineage_tags() -> dict[str, str]:
    """The DVC experiment this run belongs to, so `dvc exp show` and the MLflow UI name each other."""
    name = os.environ.get("DVC_EXP_NAME")
    return {TAG_DVC_EXPERIMENT: name} if name else {}


def start_run(cfg: Config, dataset: str, root: Path, *, stage: str, ray_run_name: str,
              params_hash: str, parent_run_id: str | None = None, name: str | None = None,
              extra_tags: dict[str, str] | None = None, uri: str | None = None,
              git: dict[str, str] | None = None, client=None,
              experiment_id: str | None = None) -> tuple[MlflowClient, str]:
    """Create the run (status RUNNING) with its tags and every param; returns (client, run_id).

    A sweep trial may run on another node: it passes the driver's ``uri`` and ``git``
    state rather than looking at a disk and environment that are not the head's.
    ``client``: the stage's ``spool.SpooledClient``, through which the params go too; a
    child run (``parent_run_id``, in the parent's ``experiment_id``) needs one.
    """
    client = client or MlflowClient(uri or tracking_uri(cfg, root))
    tags = {**(git or git_state(root)), **lineage_tags(), "dvc.stage": stage, "ray.run_name": ray_run_name,
            "params.hash": params_hash, "dataset": dataset, **(extra_tags or {})}
    params = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in flatten(cfg).items()]
    if parent_run_id:  # a sweep's trial: its run is created (spooled) even while the server is away
        tags["mlflow.parentRunId"] = parent_run_id
        return client, client.create_run_spooled(experiment_id, name or run_name(cfg), tags, params)
    experiment_id = ensure_experiment(client, experiment_name(cfg, dataset), root)
    run = client.create_run(experiment_id, run_name=name or run_name(cfg), tags=tags)
    client.log_batch(run.info.run_id, params=params)
    return client, run.info.run_id


def write_dvc_metrics(path: Path, values: dict) -> None:
    """A DVC metric file: what users compare across experiments, to 4 significant digits,
    so that `dvc metrics show` for one dataset fits a 200-column terminal."""
    def rounded(value):
        if isinstance(value, dict):
            return {key: rounded(inner) for key, inner in value.items()}
        return float(f"{value:.4g}") if isinstance(value, float) else value

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rounded(values), indent=2) + "\n")


def log_metrics(client: MlflowClient, run_id: str, values: dict[str, float], step: int) -> None:
    log_metric_rows(client, run_id, [(values, step)])


def log_metric_rows(client: MlflowClient, run_id: str, rows: list[tuple[dict[str, float], int]]) -> None:
    """Several steps' metrics in as few store calls as MLflow allows: one per 900 values, not one per step."""
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, step) for values, step in rows
               for key, value in values.items() if np.isfinite(value)]
    for start in range(0, len(metrics), 900):  # MLflow caps a batch at 1000 metrics
        client.log_batch(run_id, metrics=metrics[start:start + 900])


def end_run(client: MlflowClient, run_id: str, status: str, reason: str = "") -> None:
    """Record the outcome: FINISHED for completed / stopped_early, FAILED otherwise (with the reason)."""
    tags = [RunTag(TAG_STATUS, status)] + ([RunTag(TAG_FAILURE, reason[:5000])] if reason else [])
    client.log_batch(run_id, tags=tags)
    ok = status in ("completed", "stopped_early")
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))


def training_links(client: MlflowClient, base: str) -> list[str]:
    """One link per experiment straight to its runs table, in the training view; tags older experiments."""
    links = []
    for experiment in client.search_experiments():
        if experiment.experiment_id == DEFAULT_EXPERIMENT_ID:
            continue
        if TAG_EXPERIMENT_KIND not in experiment.tags:  # made by a version that did not tag it
            client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND, TRAINING_KIND)
        links.append(f"  {experiment.name}: {base}/#/experiments/{experiment.experiment_id}/runs?{TRAINING_VIEW}")
    return links or [f"  {base}/#/experiments?{TRAINING_VIEW}"]


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` as the server would: a taken port is one line here, not a server that hangs.

    (``mlflow server`` outlives its uvicorn worker when the bind fails, so the command would never exit.)
    """
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:  # uvicorn's choice
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise TrackerError(f"port {port} on {host} is already in use: stop what holds it, "
                               "or pick a free one with --port") from None
        raise TrackerError(f"cannot serve the UI on {host}:{port} ({err.strerror or err}): "
                           "give --host an address of this machine and --port a free port") from None


def serve_ui(root: Path, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Run the MLflow UI on the project's store until interrupted; returns the server's exit code."""
    db = (root / "mlruns" / "mlflow.db").resolve()
    if not db.exists():
        raise FileNotFoundError(f"no MLflow store at {db}: run `dvc repro` (or `ganpipe train --dataset mnist`) "
                                "first, or open your server's URL if mlflow.tracking_uri points at one")
    check_port_free(host, port)
    print(f"MLflow UI for {db} (Ctrl-C stops it); the training runs of each experiment:\n"
          + "\n".join(training_links(MlflowClient(f"sqlite:///{db}"), f"http://{host}:{port}")), flush=True)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
               "--host", host, "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(command)
    # A SIGTERM to `ganpipe ui` (a test, a supervisor) must end the server too, not orphan it.
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    try:
        return max(server.wait(), 0)
    except KeyboardInterrupt:  # Ctrl-C reached the server as well: let it finish
        server.terminate()
        server.wait()
        return 0


def log_generator(client, run_id: str, generator, latent_dim: int, registered_name: str | None,
                  metadata: dict) -> None:
    """The generator as an MLflow model (registered when a name is given); a conditional one takes (z, label).

    ``metadata`` says how to draw its input as training did (the noise kind), in the model's MLmodel file.
    """
    from importlib.metadata import version

    import torch
    from mlflow.models import infer_signature

    example = model_example(generator, latent_dim)
    inputs = {name: value.numpy() for name, value in example.items()}
    with torch.no_grad():
        output = generator(*example.values()).numpy()
    signature = infer_signature(inputs if len(inputs) > 1 else inputs["z"], output)
    # Listed, not inferred: MLflow infers requirements by loading the model in a subprocess (~8 s a run).
    requirements = [f"{package}=={version(package).split('+')[0]}" for package in ("torch", "numpy")]
    client.log_model(run_id, generator, name="generator",
                     input_example=tuple(inputs.values()) if len(inputs) > 1 else inputs["z"], signature=signature,
                     pip_requirements=requirements, registered_model_name=registered_name, metadata=metadata)
