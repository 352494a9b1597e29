"""Tracking through an outage: a real `mlflow server` killed and restarted by pid while runs log to it."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time

import numpy as np
import pandas as pd
import psutil
import pytest
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from helpers import (UNUSED_MIRROR, copy_repo, end_process_tree, image_steps, read_until, run_cmd, sweep_params,
                      tool_env)
from mlflow_server import MlflowServer
from pipeline import resume, spool, tracking
from test_train_stage import small_params

pytestmark = pytest.mark.integration


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


def test_an_outage_is_spooled_and_delivered_in_order_exactly_once(server, tmp_path):
    run_id = new_run(server)
    client = spool.SpooledClient(server.uri, tmp_path / "spool")
    tracking.log_metrics(client, run_id, {"loss": 1.0}, step=1)
    client.log_image(run_id, np.zeros((8, 8, 3), np.uint8), key="samples", step=1)
    assert not list((tmp_path / "spool").rglob("*.json")), "delivered at once while the server answers"

    # An outage shorter than a call's timeout and retry: the call waits it out, nothing is spooled.
    frozen = threading.Thread(target=freeze, args=(server, 1.0))
    frozen.start()
    tracking.log_metrics(client, run_id, {"blip": 1.0}, step=1)
    frozen.join()
    assert not client.spool.pending() and not client._backlog

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


# --------------------------------------------------------------------------- the train stage through outages

EPOCHS = 3


def outage_params(mirror_url: str, uri: str, epochs: int, flush_timeout_s: float) -> dict:
    """The train stage's small fixture, logging to the server; no worker restart allowed (ray.max_failures 0)."""
    params = small_params(mirror_url, epochs=epochs)
    params["ray"]["max_failures"] = 0  # an outage that failed a worker would fail the run
    params["mlflow"].update(tracking_uri=uri, flush_timeout_s=flush_timeout_s)
    return params


def freeze(server: MlflowServer, seconds: float, then_kill: bool = False) -> None:
    """SIGSTOP the server's processes for a while: it accepts connections and answers nothing (a hung server).
    Then they go on, or with ``then_kill`` they die without a word."""
    tree = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
    for process in tree:
        process.suspend()
    time.sleep(seconds)
    if then_kill:
        server.kill()
        return
    for process in tree:
        process.resume()


def assert_run_complete(uri: str, repo, epochs: int) -> str:
    """Every epoch's point and grid, each once, the model registered once, the run FINISHED; returns its id."""
    run_id = json.loads((repo / "metrics/train/mnist.json").read_text())["mlflow_run_id"]
    client = MlflowClient(uri, registry_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.TAG_STATUS] == "completed"
    assert resume.TAG_RESUMED not in run.data.tags  # no worker restart was spent
    for key in ("quality/fid", "epoch", "speed/img_per_s"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, epochs + 1)), key
    losses = pd.read_csv(repo / "plots/losses/mnist.csv")
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss/d")) == sorted(losses["step"])
    assert image_steps(client, run_id) == list(range(1, epochs + 1))
    assert {"checkpoint", "reference", "generator"} <= {a.path for a in client.list_artifacts(run_id)} | {
        model.name for model in client.search_logged_models([run.info.experiment_id])}
    (version,) = client.search_model_versions("name='ganpipe-mnist-generator'")
    assert version.run_id == run_id
    return run_id


def test_train_goes_on_through_a_hung_then_a_dead_server_and_ganpipe_sync_delivers(evaluated_repo, tmp_path):
    """train@mnist while the server hangs (longer than a call's timeout) and then dies, down past the stage's end:
    the stage ends 0 with its records spooled, and `ganpipe sync` delivers each of them once.

    (The sweep test below has a server that is killed and comes back while the stage still runs.)
    """
    server = MlflowServer(tmp_path / "mlflow").start()
    process = None
    try:
        repo = copy_repo(evaluated_repo, tmp_path, outage_params(UNUSED_MIRROR, server.uri, EPOCHS, 2))
        process = subprocess.Popen(["dvc", "repro", "train@mnist"], cwd=repo, env=tool_env(), text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        seen: list[str] = []
        read_until(process, r"checkpoint of epoch 1 saved", seen)
        freeze(server, 15, then_kill=True)
        seen.extend(process.stdout)
        assert process.wait(timeout=600) == 0, "".join(seen)[-4000:]
        output = "".join(seen)
        assert "is not answering: spooling" in output and "resumed from the checkpoint" not in output
        spooled = re.search(r"train@mnist: (\d+) MLflow record\(s\) still spooled in (\S+):", output)
        assert spooled, output[-4000:]
        assert int(spooled[1]) > 0 and spooled[2].endswith("ray_results/ganpipe-spool")
        assert json.loads((repo / "metrics/train/mnist.json").read_text())["epoch"] == EPOCHS  # DVC outputs anyway

        server.start()
        first = run_cmd(["ganpipe", "sync"], repo).stdout
        assert re.search(r"ganpipe sync: [1-9]\d* record\(s\) delivered .*; 0 still spooled", first), first
        assert_run_complete(server.uri, repo, EPOCHS)
        assert not list((repo / "ray_results" / "ganpipe-spool").rglob("*.json"))
        again = run_cmd(["ganpipe", "sync"], repo).stdout
        assert "ganpipe sync: 0 record(s) delivered" in again  # nothing is sent twice
    finally:
        if process is not None and process.poll() is None:
            end_process_tree(process)
        server.stop()


def test_sweep_trials_train_through_an_outage(evaluated_repo, tmp_path):
    """The server killed while the first trial trains and restarted: trials go on, runs created meanwhile too."""
    server = MlflowServer(tmp_path / "mlflow").start()
    process = None
    try:
        params = sweep_params(UNUSED_MIRROR)
        params["mlflow"].update(tracking_uri=server.uri, flush_timeout_s=300)
        repo = copy_repo(evaluated_repo, tmp_path, params)
        process = subprocess.Popen(["dvc", "repro", "sweep"], cwd=repo, env=tool_env(), text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        seen: list[str] = []
        read_until(process, r"epoch 1/3", seen)
        server.kill()
        restart = threading.Thread(target=server.start)
        restart.start()
        seen.extend(process.stdout)
        assert process.wait(timeout=900) == 0, "".join(seen)[-4000:]
        restart.join()
        output = "".join(seen)
        assert "is not answering: spooling" in output and "still spooled" not in output

        table = pd.read_csv(repo / "sweep/results.csv")
        summary = json.loads((repo / "sweep/summary.json").read_text())
        assert len(table) == 4 and summary["failed"] == 0 and "failed" not in set(table["status"])
        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("ganpipe-mnist")
        runs = client.search_runs([experiment.experiment_id])
        (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
        assert parent.info.status == "FINISHED"
        children = {run.info.run_id: run for run in runs
                    if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert set(children) == set(table["mlflow_run_id"])  # one run per trial, none created twice
        for row in table.itertuples():
            child = children[row.mlflow_run_id]
            assert child.info.status == ("FAILED" if row.status == "diverged" else "FINISHED"), row
            if row.status != "diverged":
                steps = [m.step for m in client.get_metric_history(row.mlflow_run_id, "quality/fid")]
                assert sorted(steps) == list(range(1, row.epochs_run + 1)), row
                assert image_steps(client, row.mlflow_run_id) == list(range(1, row.epochs_run + 1)), row
    finally:
        if process is not None and process.poll() is None:
            end_process_tree(process)
        server.stop()
