"""MLflow glue: where the store is, how runs are named and tagged, what they log; and the DVC metric files.

The default store is SQLite inside the project, ``sqlite:///<root>/mlruns/mlflow.db``
(artifacts land beside it in mlruns/). ``mlflow.tracking_uri`` in params.yaml or the
MLFLOW_TRACKING_URI environment variable point at a server instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient

from pipeline.config import Config, flatten

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
              git: dict[str, str] | None = None) -> tuple[MlflowClient, str]:
    """Create the run (status RUNNING) with its tags and every param; returns (client, run_id).

    A sweep trial may run on another node: it passes the driver's ``uri`` and ``git``
    state rather than looking at a disk and environment that are not the head's.
    """
    client = MlflowClient(uri or tracking_uri(cfg, root))
    experiment_id = ensure_experiment(client, experiment_name(cfg, dataset), root)
    tags = {**(git or git_state(root)), **lineage_tags(), "dvc.stage": stage, "ray.run_name": ray_run_name,
            "params.hash": params_hash, "dataset": dataset, **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=name or run_name(cfg), tags=tags)
    client.log_batch(run.info.run_id,
                     params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in flatten(cfg).items()])
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
    client.set_tag(run_id, TAG_STATUS, status)
    if reason:
        client.set_tag(run_id, TAG_FAILURE, reason[:5000])
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


def serve_ui(root: Path, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Run the MLflow UI on the project's store until interrupted; returns the server's exit code."""
    db = (root / "mlruns" / "mlflow.db").resolve()
    if not db.exists():
        raise FileNotFoundError(f"no MLflow store at {db}: run `dvc repro` (or `ganpipe train --dataset mnist`) "
                                "first, or open your server's URL if mlflow.tracking_uri points at one")
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
