"""A stage run's life on the driver, the same for train and sweep: which MLflow run it is, and how it ends.

``open_run`` finds the run: the interrupted one with the same identity (``pipeline.resume``), resumed, or a new
one, created RUNNING with every param once all checks have passed. ``ending`` ends it: FAILED with the error if
the stage raises, else as the stage says; either way what an outage of the tracking server spooled is then
delivered, for up to ``mlflow.flush_timeout_s``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline import resume, spool, tracking
from pipeline.artifacts import processed_paths
from pipeline.config import Config, params_hash


@dataclass
class StageRun:
    client: spool.SpooledClient  # an outage of the tracking server from here on spools, never fails
    run_id: str
    experiment_id: str
    ray_run_name: str  # the run's folder in ray.storage_path: named after its identity, so a rerun finds it
    resumed: bool
    git: dict[str, str]


def open_run(cfg: Config, dataset: str, root: Path, *, stage: str, storage: str, uri: str, use_gpu: bool,
             fresh: bool, named: bool = False) -> StageRun:
    """The stage's MLflow run: the interrupted one with this identity (unless ``fresh``), or a new one
    (``named``: called by its Ray run name rather than by its model and loss)."""
    git = tracking.git_state(root)
    data = resume.data_digest(root / processed_paths(dataset)["npz"])
    identity = resume.run_identity(cfg, stage=stage, dataset=dataset, data=data, use_gpu=use_gpu,
                                   git_commit=git["git.commit"])
    ray_run_name = f"{stage.split('@')[0]}-{dataset}-{identity}"
    client = spool.SpooledClient(uri, spool.spool_root(storage))
    experiment_id = tracking.ensure_experiment(client, tracking.experiment_name(cfg, dataset), root)
    interrupted = resume.take_over(client, experiment_id, stage=stage, identity=identity, data=data, fresh=fresh)
    if interrupted:
        return StageRun(client, interrupted.info.run_id, experiment_id, ray_run_name, True, git)
    resume.clear_storage(storage, ray_run_name)  # a finished run's checkpoints must not be resumed
    client, run_id = tracking.start_run(
        cfg, dataset, root, stage=stage, ray_run_name=ray_run_name, params_hash=params_hash(root / "params.yaml"),
        name=ray_run_name if named else None, uri=uri, git=git, client=client,
        extra_tags={resume.TAG_IDENTITY: identity, resume.TAG_DATA: data, **resume.driver_tags()})
    return StageRun(client, run_id, experiment_id, ray_run_name, False, git)


@contextmanager
def ending(cfg: Config, run: StageRun, storage: str, stage: str) -> Iterator[dict]:
    """Ends ``run`` as its stage ends: FAILED with the error it raises, else with the ``status`` and ``reason``
    the body leaves in the yielded dict; then settles the spool."""
    outcome = {"status": "completed", "reason": ""}
    try:
        with resume.Heartbeat(run.client, run.run_id):
            yield outcome
    except BaseException as err:
        if not isinstance(err, spool.TrackerError):  # the server refuses this run: nothing more to tell it
            tracking.end_run(run.client, run.run_id, "failed", f"{type(err).__name__}: {err}")
        spool.settle(run.client, spool.spool_root(storage), cfg.mlflow.flush_timeout_s, stage)
        raise
    tracking.end_run(run.client, run.run_id, outcome["status"], outcome["reason"])
    spool.settle(run.client, spool.spool_root(storage), cfg.mlflow.flush_timeout_s, stage)
