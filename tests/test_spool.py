"""Tracking through an outage: a real `mlflow server` killed and restarted by pid while runs log to it."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from mlflow_server import MlflowServer
from pipeline import spool, tracking


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    try:
        yield server
    finally:
        server.stop()


def new_run(server) -> str:
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("spool") or client.get_experiment(client.create_experiment("spool"))
    return client.create_run(experiment.experiment_id).info.run_id


def image_steps(client: MlflowClient, run_id: str) -> list[int]:
    names = [item.path.rsplit("/", 1)[1] for item in client.list_artifacts(run_id, "images")]
    return sorted(int(name.split("+step+")[1].split("+")[0]) for name in names if name.endswith(".png"))


def test_an_outage_is_spooled_and_delivered_in_order_exactly_once(server, tmp_path):
    run_id = new_run(server)
    client = spool.SpooledClient(server.uri, tmp_path / "spool")
    tracking.log_metrics(client, run_id, {"loss": 1.0}, step=1)
    client.log_image(run_id, np.zeros((8, 8, 3), np.uint8), key="samples", step=1)
    assert not list((tmp_path / "spool").rglob("*.json")), "delivered at once while the server answers"

    server.kill()
    started = time.monotonic()
    for step in (2, 3, 4):
        tracking.log_metrics(client, run_id, {"loss": float(step)}, step=step)
        client.log_image(run_id, np.full((8, 8, 3), step, np.uint8), key="samples", step=step)
    artifact = tmp_path / "notes.txt"
    artifact.write_text("spooled")
    client.log_artifact(run_id, str(artifact), artifact_path="extra")
    client.log_batch(run_id, params=[Param("p", "1")])
    tracking.end_run(client, run_id, "completed")
    # One call waits for MLflow's short retries; every later one only appends to the spool.
    assert time.monotonic() - started < 30
    assert len(client.spool.pending()) >= 10

    server.start()
    assert client.flush(timeout_s=120) == 0
    client.close()
    reader = MlflowClient(server.uri)
    history = sorted((m.step, m.value) for m in reader.get_metric_history(run_id, "loss"))
    assert history == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert image_steps(reader, run_id) == [1, 2, 3, 4]
    assert [a.path for a in reader.list_artifacts(run_id, "extra")] == ["extra/notes.txt"]
    run = reader.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"p": "1"}
    assert run.data.tags[tracking.TAG_STATUS] == "completed"

    # Sending twice sends nothing twice: a record replayed (a crash between sending and marking) changes nothing.
    assert spool.deliver_all(server.uri, tmp_path / "spool") == (0, 0)
    replay = spool.Spool(tmp_path / "replay" / "a-writer")
    for step in (2, 3):
        replay.append({"op": "batch", "run_id": run_id, "params": [], "tags": [],
                       "metrics": [[m.key, m.value, m.timestamp, m.step] for m in
                                   reader.get_metric_history(run_id, "loss") if m.step == step]})
    assert spool.deliver_all(server.uri, tmp_path / "replay") == (2, 0)
    assert sorted(m.step for m in reader.get_metric_history(run_id, "loss")) == [1, 2, 3, 4]


def test_a_refused_call_fails_fast_and_is_not_spooled(server, tmp_path):
    client = spool.SpooledClient(server.uri, tmp_path / "spool")
    started = time.monotonic()
    with pytest.raises(spool.TrackerError, match="refused a batch call.*retrying cannot fix this"):
        tracking.log_metrics(client, "0" * 32, {"loss": 1.0}, step=1)  # no such run: a 404
    assert time.monotonic() - started < 10
    assert not client.spool.pending()
