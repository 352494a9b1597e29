"""Long runs survive their driver: which earlier run is "the same run", taking it over, ending zombies.

A stage's run is identified by what makes it the same run: the stage, the dataset,
the data it trains on, the params that shape its training and the git commit
(``run_identity``). Its Ray
run name carries that identity, so re-running an interrupted stage points Ray at
the same folder in ``ray.storage_path``, where Ray Train and Tune find their
checkpoints and resume.

A driver killed with SIGKILL cannot end its MLflow run, so every run records its
driver (host, pid and start time, plus a heartbeat tag for drivers on other
hosts). When a stage starts, ``take_over`` looks at this stage's RUNNING runs
whose driver is gone: the one with the same identity is resumed in place, every
other one is ended KILLED with ``ganpipe.status=interrupted``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from pipeline.config import Config, ConfigError
from pipeline.tracking import TAG_STATUS

TAG_IDENTITY = "ganpipe.identity"
TAG_DATA = "ganpipe.data"             # the digest of the processed data the run trains on
TAG_DRIVER = "ganpipe.driver"         # "<host> <pid> <process start time>"
TAG_HEARTBEAT = "ganpipe.heartbeat"   # unix seconds, refreshed while the driver lives
TAG_RESUMED = "ganpipe.resumed_from_epoch"
INTERRUPTED = "interrupted"          # the ganpipe.status of a run whose driver died
HEARTBEAT_SECONDS = 30
# A driver on another host is taken for dead when its heartbeat is this old.
STALE_SECONDS = 5 * HEARTBEAT_SECONDS


def data_digest(path: Path) -> str:
    """A short digest of a processed-data file: a run interrupted on other data must not resume."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "md5").hexdigest()[:12]


def run_identity(cfg: Config, *, stage: str, dataset: str, data: str, use_gpu: bool, git_commit: str) -> str:
    """A short hash of what makes a run the same run (``data``: the ``data_digest`` of what it trains on);
    MLflow, storage and cluster addresses do not count."""
    shaping = {"stage": stage, "dataset": dataset, "data": data, "train_images": cfg.data.train_images,
               "model": cfg.model.model_dump(mode="json"),
               "train": cfg.train.model_dump(mode="json"), "evaluator": cfg.evaluator.model_dump(mode="json"),
               "num_workers": cfg.ray.num_workers, "use_gpu": use_gpu, "commit": git_commit}
    if stage == "sweep":
        shaping["sweep"] = cfg.sweep.model_dump(mode="json")
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]


def driver_tags() -> dict[str, str]:
    me = psutil.Process()
    return {TAG_DRIVER: f"{socket.gethostname()} {me.pid} {me.create_time():.2f}", TAG_HEARTBEAT: f"{time.time():.0f}"}


def driver_alive(run) -> bool:
    """Whether the process that drives this run still lives: by pid on this host, by heartbeat elsewhere."""
    tags = run.data.tags
    host, pid, started = (tags.get(TAG_DRIVER, "").split() + ["", "", ""])[:3]
    if host == socket.gethostname():
        try:
            return abs(psutil.Process(int(pid)).create_time() - float(started)) < 0.05
        except (psutil.NoSuchProcess, ValueError):
            return False
    beat = float(tags.get(TAG_HEARTBEAT, run.info.start_time / 1000))
    return time.time() - beat < STALE_SECONDS


def take_over(client: MlflowClient, experiment_id: str, *, stage: str, identity: str, data: str, fresh: bool):
    """The interrupted run of this stage and identity to resume (or None); other interrupted runs end KILLED.

    An interrupted run is a RUNNING run whose driver is gone, or one an earlier stage
    already ended as interrupted. Only the newest run of an identity is resumed, and
    only when it did not finish: a finished run is DVC's to re-run or not. One that
    trained on other data (``data``: today's digest) is said to be, in one line.
    """
    mine = client.search_runs([experiment_id], filter_string=f"tags.`dvc.stage` = '{stage}'",
                              order_by=["attributes.start_time DESC"], max_results=1000)
    top_level = [run for run in mine if "mlflow.parentRunId" not in run.data.tags]
    for run in top_level:
        if run.info.status == "RUNNING" and run.data.tags.get(TAG_IDENTITY) == identity and driver_alive(run):
            host, pid, _ = run.data.tags[TAG_DRIVER].split()
            raise ConfigError(f"{stage} with these params is already running (MLflow run {run.info.run_id}, "
                              f"pid {pid} on {host}); wait for it or stop it first")
    newest = next((run for run in top_level if run.data.tags.get(TAG_IDENTITY) == identity), None)
    resumable = newest is not None and not fresh and (
        newest.info.status == "RUNNING" or newest.data.tags.get(TAG_STATUS) == INTERRUPTED)
    for run in top_level:
        if run.info.status == "RUNNING" and not driver_alive(run) and not (resumable and run is newest):
            other_data = run.data.tags.get(TAG_DATA, data) != data
            end_interrupted(client, run.info.run_id, experiment_id,
                            why="it trained on other data (data/processed or data.train_images changed): "
                                "starting fresh" if other_data else "")
    if not resumable:
        return None
    # Its children (a sweep's trials) died with its driver: a trial Tune restores opens its run again, and one
    # Tune never saved stays ended.
    _end_as_interrupted(client, _running_children(client, experiment_id, newest.info.run_id))
    client.update_run(newest.info.run_id, status="RUNNING")
    for key, value in driver_tags().items():
        client.set_tag(newest.info.run_id, key, value)
    return newest


def end_interrupted(client: MlflowClient, run_id: str, experiment_id: str, why: str = "") -> None:
    """End a run whose driver died, and its children still RUNNING, as KILLED with ganpipe.status=interrupted."""
    _end_as_interrupted(client, [run_id, *_running_children(client, experiment_id, run_id)])
    print(f"MLflow run {run_id} was left RUNNING by a driver that is gone: ended KILLED (interrupted)"
          + (f"; {why}" if why else ""))


def _running_children(client: MlflowClient, experiment_id: str, run_id: str) -> list[str]:
    return [child.info.run_id for child in client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'")]


def _end_as_interrupted(client: MlflowClient, run_ids: list[str]) -> None:
    for run_id in run_ids:
        client.set_tag(run_id, TAG_STATUS, INTERRUPTED)
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))


class Heartbeat:
    """Refreshes the run's heartbeat tag while the driver lives (a daemon thread), for hosts that cannot see its pid."""

    def __init__(self, client: MlflowClient, run_id: str):
        # Straight to the server, past any spool: a heartbeat an outage missed is worth nothing later.
        self.client, self.run_id = getattr(client, "client", client), run_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="ganpipe-heartbeat")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.client.set_tag(self.run_id, TAG_HEARTBEAT, f"{time.time():.0f}")
            except Exception:  # a store that blips must not end the run; the next beat retries
                pass

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def clear_storage(storage: str, name: str) -> None:
    """Remove the Ray run folder ``<storage>/<name>`` (a local path or a URI) so a fresh run starts at epoch 1."""
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage if "://" in storage else os.path.abspath(storage))
    folder = f"{root.rstrip('/')}/{name}"
    if filesystem.get_file_info(folder).type != pyarrow.fs.FileType.NotFound:
        filesystem.delete_dir(folder)



@contextmanager
def readable_checkpoint(checkpoint, rank: int):
    """(this rank's state, the local folder) of the newest checkpoint that loads, for the ``with`` block.

    A checkpoint cut short (a worker killed while writing it, a full disk) fails to
    load; then the one before it in the same run folder is used, with one warning
    naming both. Every rank reads every rank's file, so all ranks pick the same one.
    """
    first_error = ""
    for candidate in [checkpoint, *_older_checkpoints(checkpoint)]:
        with candidate.as_directory() as folder:
            folder = Path(folder)
            try:
                states = {path.name: torch.load(path, weights_only=True, map_location="cpu")
                          for path in sorted(folder.glob("rank*.pt"))}
                state = states[f"rank{rank}.pt"]
            except Exception as err:  # a cut file: RuntimeError, EOFError, UnpicklingError, KeyError...
                first_error = first_error or f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
                continue
            if candidate is not checkpoint and rank == 0:
                print(f"warning: the newest checkpoint {checkpoint.path} is unreadable ({first_error}); "
                      f"resuming from the one before it, {candidate.path}", flush=True)
            yield state, folder
            return
    raise RuntimeError(f"no checkpoint in {Path(checkpoint.path).parent} is readable; "
                       f"the newest, {checkpoint.path}: {first_error}")


def _older_checkpoints(checkpoint) -> list:
    """The checkpoints saved before ``checkpoint`` in its run folder, newest first (Ray names them in order)."""
    from pyarrow import fs

    parent, _, name = checkpoint.path.rstrip("/").rpartition("/")
    entries = checkpoint.filesystem.get_file_info(fs.FileSelector(parent))
    older = sorted((entry.path for entry in entries if entry.type == fs.FileType.Directory
                    and entry.base_name.startswith("checkpoint_") and entry.base_name < name), reverse=True)
    return [type(checkpoint)(path, filesystem=checkpoint.filesystem) for path in older]
