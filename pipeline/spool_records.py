"""The spool on disk: records in order, delivered exactly once, and how each kind is replayed on MLflow.

A writer's folder holds ``<NNNNNNNN>.json`` records (with their files in
``<NNNNNNNN>.files/``), written atomically, oldest first. A record is marked
delivered by deleting its JSON file under an exclusive ``flock`` on the folder, so
two processes never deliver the same folder at once. A crash between sending and
marking resends the record, and every record is idempotent on the server: metrics
carry their timestamp (MLflow keeps one row per key, step, timestamp and value),
params and tags are set to the same value, artifacts and image files overwrite
their own paths, a run created from the spool is found again by its placeholder
tag, and the model is logged once per run (a tag records it).

A record that can never be delivered (not JSON, an unknown operation, missing
fields, or refused by the server) is moved, never deleted, to the root's
``quarantine/`` folder as ``<writer>-<NNNNNNNN>.json`` (with its ``.files``), named in
one printed line; the records after it are delivered as usual. The quarantine sits
beside the writer folders, not in one, because an emptied writer folder is removed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

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


# Each operation a record may hold, with the fields its replay reads.
FIELDS = {"create_run": ("experiment_id", "run_name", "tags", "params"), "batch": ("metrics", "params", "tags"),
          "artifacts": ("artifact_path",), "terminate": ("status", "end_time"), "update_run": ("status",),
          "model": ("name", "signature", "pip_requirements", "registered_model_name")}
QUARANTINE = "quarantine"


class TrackerError(RuntimeError):
    """MLflow cannot take what was asked, for a reason retrying cannot fix: a refused call, records that
    cannot be delivered, a spool folder that is not there, a UI port that is taken."""


class BadRecord(ValueError):
    """A spool record that cannot be read or replayed: not JSON, an unknown operation, missing fields."""


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
    """One writer's folder of records, delivered oldest first; ``report`` names a quarantined record in one line."""

    def __init__(self, folder: Path, report: Callable[[str], None] | None = None):
        self.folder = Path(folder)
        self.report = report or (lambda line: print(f"MLflow: {line}", flush=True))
        self.quarantined = 0
        self.folder.mkdir(parents=True, exist_ok=True)
        existing = self.pending()
        self._next = int(existing[-1].stem) + 1 if existing else 1

    def pending(self) -> list[Path]:
        return sorted(path for path in self.folder.glob("[0-9]*.json") if path.stem.isdigit())

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
        """Send pending records in order until one fails for a transport reason; returns how many are left.

        A record that cannot be read is quarantined and reported, and the next one goes on. One the server
        refuses is quarantined and raises TrackerError: a writer fails fast, as its next calls would fail too.
        """
        with self.locked(wait) as held:
            if not held:
                return len(self.pending())
            for path in self.pending():
                files = path.with_suffix(".files")
                try:
                    record = read_record(path)
                except BadRecord as err:
                    self.report(f"spool record {path} cannot be delivered ({err}): moved to "
                                f"{self._quarantine(path, files)}")
                    continue
                try:
                    if record["op"] == "create_run":
                        self._remember(record["run_id"], send(record, files))
                    else:
                        send({**record, "run_id": self.resolve(record["run_id"])}, files)
                except Exception as err:
                    if is_transport_failure(err):
                        return len(self.pending())
                    moved = self._quarantine(path, files)
                    raise TrackerError(f"the MLflow server refused a {record['op']} call ({_one_line(err)}); "
                                       f"retrying cannot fix this: the record is moved to {moved}") from None
                _drop(path, files)
            return 0

    def _quarantine(self, record: Path, files: Path) -> Path:
        """Move a record that can never be delivered, and its files, to the root's quarantine; its new path."""
        folder = self.folder.parent / QUARANTINE
        folder.mkdir(exist_ok=True)
        stem, copies = f"{self.folder.name}-{record.stem}", 1
        while (folder / f"{stem}.json").exists():  # never overwrite an earlier one
            copies += 1
            stem = f"{self.folder.name}-{record.stem}-{copies}"
        if files.exists():  # the files first: the record's own move is the mark that it left the queue
            os.replace(files, folder / f"{stem}.files")
        os.replace(record, folder / f"{stem}.json")
        self.quarantined += 1
        return folder / f"{stem}.json"

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


def read_record(path: Path) -> dict:
    """A record as ``Spool.append`` wrote it; BadRecord says what is wrong with one that is not."""
    try:
        record = json.loads(path.read_bytes())
    except ValueError as err:  # truncated JSON, or bytes that are not text
        raise BadRecord(f"not JSON: {err}") from None
    if not isinstance(record, dict):
        raise BadRecord(f"a JSON {type(record).__name__}, not an object")
    if record.get("op") not in FIELDS:
        raise BadRecord(f"unknown operation {record.get('op')!r}, known: {', '.join(FIELDS)}")
    missing = [key for key in ("run_id", *FIELDS[record["op"]]) if key not in record]
    if missing:
        raise BadRecord(f"a {record['op']} record without {', '.join(missing)}")
    return record


def _drop(record: Path, files: Path) -> None:
    record.unlink(missing_ok=True)  # the mark of delivery: from here on it is not sent again
    shutil.rmtree(files, ignore_errors=True)


def send_record(client: MlflowClient, record: dict, files: Path) -> str | None:
    """Replay one record on the server; every kind is idempotent (see the module's docstring).
    A run's creation returns the run's id."""
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


def _send_model(client: MlflowClient, run_id: str, record: dict, files: Path) -> None:
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature

    if client.get_run(run_id).data.tags.get(TAG_MODEL_LOGGED) == record["name"]:
        return
    model = torch.load(files / "model.pt", weights_only=False)
    with np.load(files / "example.npz") as saved:
        examples = tuple(saved[f"arr_{i}"] for i in range(len(saved.files)))
    mlflow.set_tracking_uri(client.tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(model, name=record["name"], input_example=examples if len(examples) > 1 else examples[0],
                                 signature=ModelSignature.from_dict(record["signature"]),
                                 pip_requirements=record["pip_requirements"],
                                 registered_model_name=record["registered_model_name"],
                                 metadata=record.get("metadata"))
    client.set_tag(run_id, TAG_MODEL_LOGGED, record["name"])


def deliver_all(tracking_uri: str, spool_root: str | Path, timeout_s: float = 0.0,
                report: Callable[[str], None] | None = None) -> tuple[int, int]:
    """Deliver every writer folder under ``spool_root`` (retrying with backoff up to ``timeout_s``).

    Returns (records delivered, records still spooled). A folder another process is
    delivering right now is waited for, so nothing is sent twice. A record that can
    never be delivered is quarantined and the rest go on; each such record is named
    through ``report``, one line each, or without it (``ganpipe sync``) in one
    TrackerError once all else is delivered.
    """
    use_short_http_retries()
    root = Path(spool_root)
    if not root.is_dir():
        raise TrackerError(f"{root}: no such spool folder: check the path (a stage that leaves records says "
                           "\"still spooled in <folder>\")")
    problems: list[str] = []
    say = report or problems.append
    client = MlflowClient(tracking_uri)

    def send(record: dict, files: Path) -> str | None:
        return send_record(client, record, files)

    spools = [Spool(folder, say) for folder in sorted(root.iterdir())
              if folder.is_dir() and folder.name not in ("runs", QUARANTINE)]
    before = sum(len(spool.pending()) for spool in spools)
    deadline, attempt = time.monotonic() + timeout_s, 0
    while True:
        left = sum(_deliver_past_refusals(spool, send) for spool in spools)
        if left == 0 or time.monotonic() >= deadline:
            break
        time.sleep(min(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)], max(deadline - time.monotonic(), 0)))
        attempt += 1
    for spool in spools:
        if not spool.pending() and _writer_gone(spool.folder.name):
            shutil.rmtree(spool.folder, ignore_errors=True)  # nothing left to say, and no one to say it
    delivered = before - left - sum(spool.quarantined for spool in spools)
    if problems:
        raise TrackerError(f"{'; '.join(problems)}; {delivered} other record(s) delivered to {tracking_uri}, "
                           f"{left} still spooled")
    return delivered, left


def _deliver_past_refusals(spool: Spool, send) -> int:
    """Deliver one folder; a refused record is quarantined and named, and the records after it still go."""
    while True:
        try:
            return spool.deliver(send)
        except TrackerError as err:
            spool.report(str(err))


def _writer_gone(writer: str) -> bool:
    """Whether the process that wrote a spool folder (named <host>-<pid>-<tag>) has ended, as far as this host knows."""
    import psutil

    host, _, pid = writer.rpartition("-")[0].rpartition("-")
    return pid.isdigit() and host == socket.gethostname() and not psutil.pid_exists(int(pid))
