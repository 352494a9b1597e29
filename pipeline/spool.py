"""Tracking that cannot take training down: every MLflow write goes through a write-ahead spool.

``SpooledClient`` stands in for ``MlflowClient`` wherever rank 0 or a driver writes
(metrics, params, tags, images, artifacts, the model, the run status). Each call is
first appended, in order, to the writer's spool folder as one record (a JSON file,
with its files beside it), then delivered at once while the server answers. When
a delivery fails for a transport reason (connection refused, timeout, 5xx), the
record stays, later calls only append, and a background thread retries with
backoff; training never waits on the server. A tracker error that retrying cannot
fix (a 4xx: bad credentials, a deleted run or experiment) fails fast instead.

Delivery is in order and exactly once: a record is marked delivered by deleting its
JSON file (atomic) under an exclusive lock on the writer's folder, so two
processes never deliver the same folder at once. A crash between sending and
marking resends the record, and every record is idempotent on the server: metrics
carry their timestamp (MLflow keeps one row per key, step, timestamp and value),
params and tags are set to the same value, artifacts and image files overwrite
their own paths, and the model is logged once per run (a tag records it).

Layout: ``<spool root>/<writer>/<NNNNNNNN>.json`` and ``<NNNNNNNN>.files/``, one
writer folder per process. ``deliver_all`` (the driver at the end, ``ganpipe
sync``) delivers every writer folder under a spool root.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

# MLflow's own HTTP retries (7 with doubling backoff, 120 s timeouts) block a call for minutes:
# here a failed call is spooled after about a second and retried in the background instead.
SHORT_HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
BACKOFF_S = (1, 2, 4, 8, 15, 30)
TAG_MODEL_LOGGED = "ganpipe.model_logged"
# A run created while the server was away: records name it by a placeholder until it exists.
PENDING, TAG_SPOOL_KEY = "pending-", "ganpipe.spool_key"
MAX_BATCH = 900  # MLflow caps a batch at 1000 metrics


class TrackerError(RuntimeError):
    """The tracking server refused a call for a reason retrying cannot fix."""


class RunNotCreatedYet(ConnectionError):
    """A record for a run whose creation another writer has not delivered yet: retried like an outage."""


def use_short_http_retries() -> None:
    """Short MLflow HTTP retries in this process, unless the user set their own."""
    for key, value in SHORT_HTTP_RETRIES.items():
        os.environ.setdefault(key, value)
    # urllib3 warns at every retry; the spool says once that the server is away and once that it is back.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def is_transport_failure(err: BaseException) -> bool:
    """Connection refused or reset, a timeout, or a 5xx / 429 answer: worth retrying later."""
    import requests

    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                        TimeoutError)):
        return True
    if isinstance(err, requests.exceptions.HTTPError):
        return err.response is None or err.response.status_code >= 500 or err.response.status_code == 429
    if isinstance(err, RestException):
        return err.get_http_status_code() >= 500
    if isinstance(err, MlflowException):
        message = str(err)
        if "failed with exception" in message or "failed with timeout" in message:
            return True  # MLflow wraps refused connections and exhausted retries this way
        if message.startswith("API request to endpoint"):
            return err.get_http_status_code() >= 500 or " 429 " in message
    return False


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


class Spool:
    """One writer's folder of records, delivered oldest first."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        existing = self.pending()
        self._next = int(existing[-1].stem) + 1 if existing else 1

    def pending(self) -> list[Path]:
        return sorted(self.folder.glob("[0-9]*.json"))

    def append(self, record: dict, stage_files=None) -> Path:
        """Write the record (and its files, staged by ``stage_files(folder)``) atomically, after all others."""
        number = f"{self._next:08d}"
        self._next += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        if stage_files:
            files = self.folder / f"{number}.files"
            files.mkdir()
            stage_files(files)
        final = self.folder / f"{number}.json"
        partial = self.folder / f".{number}.json.tmp"
        partial.write_text(json.dumps(record))
        os.replace(partial, final)  # a reader sees a whole record or none
        return final

    @contextmanager
    def locked(self, wait: bool = True):
        """An exclusive lock on the folder across processes; yields False when ``wait`` is off and it is taken."""
        with open(self.folder / ".lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def deliver(self, send, wait: bool = True) -> int:
        """Send pending records in order until one fails; returns how many are left.

        A transport failure stops here and leaves the record; any other error
        drops the record (it can never be delivered) and raises TrackerError.
        """
        with self.locked(wait) as held:
            if not held:
                return len(self.pending())
            for path in self.pending():
                files, record = path.with_suffix(".files"), json.loads(path.read_text())
                try:
                    if record["op"] == "create_run":
                        self._remember(record["run_id"], send(record, files))
                    else:
                        send({**record, "run_id": self.resolve(record["run_id"])}, files)
                except Exception as err:
                    if is_transport_failure(err):
                        return len(self.pending())
                    _drop(path, files)
                    raise TrackerError(f"the MLflow server refused a {record['op']} call ({_one_line(err)}); "
                                       "retrying cannot fix this") from None
                _drop(path, files)
            return 0


    def resolve(self, run_id: str) -> str:
        """The server's id of a run, also of one first created in a spool (by any writer under the same root)."""
        if not run_id.startswith(PENDING):
            return run_id
        created = self.folder.parent / "runs" / run_id
        if not created.exists():
            raise RunNotCreatedYet(run_id)
        return created.read_text()

    def _remember(self, placeholder: str, run_id: str) -> None:
        folder = self.folder.parent / "runs"
        folder.mkdir(exist_ok=True)
        partial = folder / f".{placeholder}.tmp"
        partial.write_text(run_id)
        os.replace(partial, folder / placeholder)


def _drop(record: Path, files: Path) -> None:
    record.unlink(missing_ok=True)  # the mark of delivery: from here on it is not sent again
    shutil.rmtree(files, ignore_errors=True)


def send_record(client: MlflowClient, record: dict, files: Path) -> None:
    """Replay one record on the server; every kind is idempotent (see the module's docstring)."""
    op, run_id = record["op"], record["run_id"]
    if op == "create_run":  # once: a resend finds the run its first send created by its placeholder tag
        found = client.search_runs([record["experiment_id"]], filter_string=f"tags.`{TAG_SPOOL_KEY}` = '{run_id}'")
        if found:
            return found[0].info.run_id
        created = client.create_run(record["experiment_id"], run_name=record["run_name"], tags=record["tags"])
        client.log_batch(created.info.run_id, params=[Param(key, value) for key, value in record["params"]])
        return created.info.run_id
    if op == "batch":
        metrics = [Metric(key, value, timestamp, step) for key, value, timestamp, step in record["metrics"]]
        params = [Param(key, value) for key, value in record["params"]]
        tags = [RunTag(key, value) for key, value in record["tags"]]
        for start in range(0, max(len(metrics), 1), MAX_BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + MAX_BATCH],
                             params=params if start == 0 else [], tags=tags if start == 0 else [])
    elif op == "artifacts":
        client.log_artifacts(run_id, str(files), artifact_path=record["artifact_path"])
    elif op == "terminate":
        client.set_terminated(run_id, record["status"], end_time=record["end_time"])
    elif op == "update_run":
        client.update_run(run_id, status=record["status"])
    elif op == "model":
        _send_model(client, run_id, record, files)
    else:
        raise ValueError(f"unknown spool record {op!r}")


def _send_model(client: MlflowClient, run_id: str, record: dict, files: Path) -> None:
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature

    if client.get_run(run_id).data.tags.get(TAG_MODEL_LOGGED) == record["name"]:
        return
    model = torch.load(files / "model.pt", weights_only=False)
    mlflow.set_tracking_uri(client.tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(model, name=record["name"], input_example=np.load(files / "example.npy"),
                                 signature=ModelSignature.from_dict(record["signature"]),
                                 pip_requirements=record["pip_requirements"],
                                 registered_model_name=record["registered_model_name"])
    client.set_tag(run_id, TAG_MODEL_LOGGED, record["name"])


class SpooledClient:
    """An MlflowClient whose writes go through this process's spool; reads go straight to the server."""

    def __init__(self, tracking_uri: str, spool_root: str | Path):
        use_short_http_retries()
        self.client = MlflowClient(tracking_uri)
        writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.spool = Spool(Path(spool_root) / writer)
        self._lock = threading.Lock()
        self._backlog = False
        self._retrying: threading.Thread | None = None
        self._closed = threading.Event()

    def __getattr__(self, name):  # search_runs, get_run, get_metric_history, tracking_uri, ...
        return getattr(self.client, name)

    # ------------------------------------------------------------------ writes

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        self._submit({"op": "batch", "run_id": run_id,
                      "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
                      "params": [[p.key, str(p.value)] for p in params],
                      "tags": [[t.key, str(t.value)] for t in tags]})

    def set_tag(self, run_id: str, key: str, value) -> None:
        self.log_batch(run_id, tags=[RunTag(key, str(value))])

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self._submit({"op": "artifacts", "run_id": run_id, "artifact_path": artifact_path},
                     lambda folder: shutil.copy(local_path, folder / Path(local_path).name))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._log_file(run_id, artifact_file, lambda path: path.write_text(text))

    def log_dict(self, run_id: str, dictionary: dict, artifact_file: str) -> None:
        import yaml

        def write(path: Path) -> None:
            path.write_text(json.dumps(dictionary, indent=2) if path.suffix == ".json"
                            else yaml.safe_dump(dictionary, sort_keys=False))
        self._log_file(run_id, artifact_file, write)

    def log_image(self, run_id: str, image, key: str, step: int) -> None:
        """MLflow's per-step image (the UI's slider), with its file names fixed once so a resend overwrites them."""
        from mlflow.tracking.multimedia import compress_image_size, convert_to_pil_image

        picture = convert_to_pil_image(image)
        stem = f"{key.replace('/', '~')}+step+{step}+timestamp+{int(time.time() * 1000)}+{uuid.uuid4()}"

        def write(folder: Path) -> None:
            picture.save(folder / f"{stem}.png")
            compress_image_size(picture).save(folder / f"{stem}+compressed.webp")
        self._submit({"op": "artifacts", "run_id": run_id, "artifact_path": "images"}, write)
        self.set_tag(run_id, "mlflow.loggedImages", True)

    def log_model(self, run_id: str, model, *, name: str, input_example, signature, pip_requirements: list[str],
                  registered_model_name: str | None) -> None:
        import numpy as np
        import torch

        def write(folder: Path) -> None:
            torch.save(model, folder / "model.pt")
            np.save(folder / "example.npy", input_example)
        self._submit({"op": "model", "run_id": run_id, "name": name, "signature": signature.to_dict(),
                      "pip_requirements": pip_requirements, "registered_model_name": registered_model_name}, write)

    def create_run_spooled(self, experiment_id: str, run_name: str, tags: dict[str, str], params: list) -> str:
        """A new run's id, or a placeholder when the server is away: the run is created when it is back."""
        placeholder = PENDING + uuid.uuid4().hex
        self._submit({"op": "create_run", "run_id": placeholder, "experiment_id": experiment_id,
                      "run_name": run_name, "tags": {**tags, TAG_SPOOL_KEY: placeholder},
                      "params": [[p.key, str(p.value)] for p in params]})
        try:
            return self.spool.resolve(placeholder)
        except RunNotCreatedYet:
            return placeholder

    def set_terminated(self, run_id: str, status: str = "FINISHED") -> None:
        self._submit({"op": "terminate", "run_id": run_id, "status": status, "end_time": int(time.time() * 1000)})

    def update_run(self, run_id: str, status: str) -> None:
        self._submit({"op": "update_run", "run_id": run_id, "status": status})

    def _log_file(self, run_id: str, artifact_file: str, write) -> None:
        folder, name = os.path.split(artifact_file)
        self._submit({"op": "artifacts", "run_id": run_id, "artifact_path": folder or None},
                     lambda files: write(files / name))

    # ------------------------------------------------------------------ delivery

    def _submit(self, record: dict, stage_files=None) -> None:
        with self._lock:
            self.spool.append(record, stage_files)
            if self._backlog:
                return  # the background thread delivers it, after everything before it
            if self.spool.deliver(self._send) == 0:
                return
            self._backlog = True
        print(f"MLflow at {self.client.tracking_uri} is not answering: spooling to {self.spool.folder} "
              "and retrying in the background; training goes on", flush=True)
        self._retrying = threading.Thread(target=self._retry, daemon=True, name="ganpipe-spool")
        self._retrying.start()

    def _send(self, record: dict, files: Path) -> None:
        send_record(self.client, record, files)

    def _retry(self) -> None:
        attempt = 0
        while not self._closed.wait(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]):
            attempt += 1
            with self._lock:
                try:
                    left = self.spool.deliver(self._send)
                except TrackerError as err:
                    print(f"MLflow: {err}", flush=True)  # a record that can never go; the rest may
                    left = len(self.spool.pending())
                if left == 0:
                    self._backlog = False
                    print(f"MLflow at {self.client.tracking_uri} answers again: the spool is delivered", flush=True)
                    return

    def flush(self, timeout_s: float) -> int:
        """Try to drain the spool for up to ``timeout_s``; how many records are still undelivered."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if not self._backlog or self.spool.deliver(self._send) == 0:
                    self._backlog = False
                    return 0
            if time.monotonic() >= deadline:
                return len(self.spool.pending())
            time.sleep(1)

    def close(self) -> None:
        """Stop retrying in this process; what is left stays in the spool for the driver or `ganpipe sync`."""
        self._closed.set()
        if self._retrying is not None:
            self._retrying.join()


def deliver_all(tracking_uri: str, spool_root: str | Path, timeout_s: float = 0.0) -> tuple[int, int]:
    """Deliver every writer folder under ``spool_root`` (retrying with backoff up to ``timeout_s``).

    Returns (records delivered, records still spooled). A folder another process is
    delivering right now is waited for, so nothing is sent twice.
    """
    use_short_http_retries()
    root = Path(spool_root)
    if not root.is_dir():
        return 0, 0
    client = MlflowClient(tracking_uri)
    spools = [Spool(folder) for folder in sorted(root.iterdir()) if folder.is_dir() and folder.name != "runs"]
    before = sum(len(spool.pending()) for spool in spools)
    deadline, attempt = time.monotonic() + timeout_s, 0
    while True:
        left = sum(spool.deliver(lambda record, files: send_record(client, record, files)) for spool in spools)
        if left == 0 or time.monotonic() >= deadline:
            break
        time.sleep(min(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)], max(deadline - time.monotonic(), 0)))
        attempt += 1
    for spool in spools:
        if not spool.pending() and _writer_gone(spool.folder.name):
            shutil.rmtree(spool.folder, ignore_errors=True)  # nothing left to say, and no one to say it
    return before - left, left


def _writer_gone(writer: str) -> bool:
    """Whether the process that wrote a spool folder (named <host>-<pid>-<tag>) has ended, as far as this host knows."""
    import psutil

    host, _, pid = writer.rpartition("-")[0].rpartition("-")
    return pid.isdigit() and host == socket.gethostname() and not psutil.pid_exists(int(pid))


def spool_root(storage: str) -> Path:
    """Where spools live: beside the Ray runs when ray.storage_path is a (shared) folder, else in the home folder."""
    if "://" not in storage:
        return Path(storage) / "ganpipe-spool"
    return Path.home() / ".cache" / "ganpipe" / "spool"


def settle(client: SpooledClient, root: Path, timeout_s: float, stage: str) -> int:
    """A stage's end: stop retrying in the background, then deliver every spool under ``root`` for up to
    ``timeout_s``; says in one line what is left and where. Returns the records still spooled."""
    client.close()
    _, left = deliver_all(client.tracking_uri, root, timeout_s)
    if left:
        print(f"{stage}: {left} MLflow record(s) still spooled in {root}: the server did not answer within "
              f"mlflow.flush_timeout_s = {timeout_s:g} s; deliver them later with `ganpipe sync`", flush=True)
    return left
