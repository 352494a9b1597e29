"""Tracking that cannot take training down: every MLflow write goes through a write-ahead spool.

``SpooledClient`` stands in for ``MlflowClient`` wherever rank 0 or a driver writes
(metrics, params, tags, images, artifacts, the model, the run status). Each call is
first appended, in order, to the writer's spool folder as one record, then
delivered at once while the server answers. When a delivery fails for a transport
reason (connection refused, timeout, 5xx), the record stays, later calls only
append, and a background thread retries with backoff; training never waits on the
server. A tracker error that retrying cannot fix (a 4xx: bad credentials, a deleted
run or experiment) fails fast instead. How records are stored and delivered exactly
once: ``pipeline.spool_records``.

Layout: ``<spool root>/<writer>/``, one writer folder per process, and
``<spool root>/quarantine/`` for records that can never be delivered (moved there
and named, never deleted). ``deliver_all`` (the driver at the end, ``ganpipe sync``)
delivers every writer folder under a root.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from pipeline.spool_records import (BACKOFF_S, PENDING, TAG_SPOOL_KEY, RunNotCreatedYet, Spool, TrackerError,
                                    deliver_all, is_transport_failure, send_record, use_short_http_retries)

__all__ = ["SpooledClient", "Spool", "TrackerError", "deliver_all", "is_transport_failure", "settle", "spool_root"]


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

    def logged_image_steps(self, run_id: str, key: str) -> set[int]:
        """The steps of the run's images under ``key``, read from the file names ``log_image`` gives them."""
        prefix = f"{key.replace('/', '~')}+step+"
        names = [Path(item.path).name for item in self.client.list_artifacts(run_id, "images")]
        return {int(name[len(prefix):].split("+")[0]) for name in names
                if name.startswith(prefix) and name.endswith(".png")}

    def log_model(self, run_id: str, model, *, name: str, input_example, signature, pip_requirements: list[str],
                  registered_model_name: str | None, metadata: dict | None = None) -> None:
        import numpy as np
        import torch

        def write(folder: Path) -> None:
            torch.save(model, folder / "model.pt")
            # one array, or a tuple of them for a model of several inputs (z, label)
            examples = input_example if isinstance(input_example, tuple) else (input_example,)
            np.savez(folder / "example.npz", *examples)
        self._submit({"op": "model", "run_id": run_id, "name": name, "signature": signature.to_dict(),
                      "pip_requirements": pip_requirements, "registered_model_name": registered_model_name,
                      "metadata": metadata}, write)

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

    def _send(self, record: dict, files: Path) -> str | None:
        return send_record(self.client, record, files)

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


def spool_root(storage: str) -> Path:
    """Where spools live: beside the Ray runs when ray.storage_path is a (shared) folder, else in the home folder."""
    if "://" not in storage:
        return Path(storage) / "ganpipe-spool"
    return Path.home() / ".cache" / "ganpipe" / "spool"


def settle(client: SpooledClient, root: Path, timeout_s: float, stage: str) -> int:
    """A stage's end: stop retrying in the background, then deliver every spool under ``root`` for up to
    ``timeout_s``; says in one line what is left and where. Returns the records still spooled."""
    client.close()
    _, left = deliver_all(client.tracking_uri, root, timeout_s,
                          report=lambda line: print(f"{stage}: {line}", flush=True))
    if left:
        print(f"{stage}: {left} MLflow record(s) still spooled in {root}: the server did not answer within "
              f"mlflow.flush_timeout_s = {timeout_s:g} s; deliver them later with `ganpipe sync`", flush=True)
    return left
