"""Which earlier run a stage resumes, and which it ends as interrupted: a real MLflow SQLite store, no Ray."""

from __future__ import annotations

import socket
import subprocess
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from helpers import project_params
from pipeline import resume
from pipeline.config import ConfigError, apply_overrides, validate

STAGE = "train@mnist"
DATA = "d1g35t"  # the data digest the runs below trained on


@pytest.fixture
def store(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, client.create_experiment("ganpipe-mnist")


def dead_driver() -> str:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return f"{socket.gethostname()} {finished.pid} {time.time():.2f}"


def make_run(store, identity: str, driver: str, status: str = "RUNNING", **tags) -> str:
    client, experiment_id = store
    run = client.create_run(experiment_id, tags={"dvc.stage": STAGE, resume.TAG_IDENTITY: identity,
                                                 resume.TAG_DRIVER: driver, **tags})
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def status(store, run_id: str) -> tuple[str, str | None]:
    run = store[0].get_run(run_id)
    return run.info.status, run.data.tags.get("ganpipe.status")


def test_interrupted_run_is_resumed_and_other_zombies_end_killed(store):
    client, experiment_id = store
    other = make_run(store, "bbb", dead_driver())
    child = client.create_run(experiment_id, tags={"dvc.stage": STAGE, "mlflow.parentRunId": other}).info.run_id
    interrupted = make_run(store, "aaa", dead_driver())
    trial = client.create_run(experiment_id, tags={"dvc.stage": STAGE, "mlflow.parentRunId": interrupted}).info.run_id

    taken = resume.take_over(client, experiment_id, stage=STAGE, identity="aaa", data=DATA, fresh=False)
    assert taken.info.run_id == interrupted
    assert status(store, interrupted) == ("RUNNING", None)
    # Its trial died with the driver: ended, until a trial Tune restores opens it again.
    assert status(store, trial) == ("KILLED", "interrupted")
    assert resume.driver_alive(client.get_run(interrupted))  # this process drives it now
    assert status(store, other) == ("KILLED", "interrupted")
    assert status(store, child) == ("KILLED", "interrupted")  # with its sweep parent


def test_run_ended_as_interrupted_can_still_be_resumed(store):
    client, experiment_id = store
    run_id = make_run(store, "aaa", dead_driver())
    resume.take_over(client, experiment_id, stage=STAGE, identity="other", data=DATA, fresh=False)  # another config ran
    assert status(store, run_id) == ("KILLED", "interrupted")

    assert resume.take_over(client, experiment_id, stage=STAGE, identity="aaa", data=DATA, fresh=False).info.run_id == run_id
    assert status(store, run_id)[0] == "RUNNING"


def test_fresh_and_finished_runs_are_not_resumed(store):
    client, experiment_id = store
    interrupted = make_run(store, "aaa", dead_driver())
    assert resume.take_over(client, experiment_id, stage=STAGE, identity="aaa", data=DATA, fresh=True) is None
    assert status(store, interrupted) == ("KILLED", "interrupted")

    make_run(store, "ccc", dead_driver(), status="FINISHED")
    assert resume.take_over(client, experiment_id, stage=STAGE, identity="ccc", data=DATA, fresh=False) is None


def test_same_run_with_a_live_driver_is_refused(store):
    client, experiment_id = store
    make_run(store, "aaa", resume.driver_tags()[resume.TAG_DRIVER])
    with pytest.raises(ConfigError, match=f"{STAGE} with these params is already running"):
        resume.take_over(client, experiment_id, stage=STAGE, identity="aaa", data=DATA, fresh=False)


def test_driver_on_another_host_is_judged_by_its_heartbeat(store):
    client, experiment_id = store
    fresh_beat = make_run(store, "aaa", "elsewhere 1 1.0", **{resume.TAG_HEARTBEAT: f"{time.time():.0f}"})
    old_beat = make_run(store, "bbb", "elsewhere 1 1.0",
                        **{resume.TAG_HEARTBEAT: f"{time.time() - resume.STALE_SECONDS - 5:.0f}"})
    assert resume.driver_alive(client.get_run(fresh_beat))
    assert not resume.driver_alive(client.get_run(old_beat))


def test_identity_follows_training_params_only():
    cfg = validate(project_params())

    def identity(config):
        return resume.run_identity(config, stage=STAGE, dataset="mnist", data=DATA, use_gpu=False, git_commit="abc")

    same = [apply_overrides(project_params(), {key: value}) for key, value in [
        ("mlflow.tracking_uri", "http://server:5000"), ("ray.address", "auto"), ("ray.storage_path", "s3://b/r"),
        ("data.mirrors.mnist", ["file:///data"]), ("ray.max_failures", 5)]]
    assert {identity(validate(params)) for params in same} == {identity(cfg)}
    assert identity(validate(apply_overrides(project_params(), {"train.lr_g": 1e-3}))) != identity(cfg)
    assert identity(validate(apply_overrides(project_params(), {"ray.num_workers": 4}))) != identity(cfg)
    assert identity(validate(apply_overrides(project_params(), {"data.train_images": 100}))) != identity(cfg)
    assert resume.run_identity(cfg, stage=STAGE, dataset="mnist", data=DATA, use_gpu=False,
                               git_commit="def") != identity(cfg)
    assert resume.run_identity(cfg, stage=STAGE, dataset="mnist", data="other", use_gpu=False,
                               git_commit="abc") != identity(cfg)


def test_a_run_interrupted_on_other_data_is_not_resumed_and_says_why(store, tmp_path, capsys):
    client, experiment_id = store
    cfg = validate(project_params())
    digests = []
    for name, n in (("before", 10), ("after", 20)):  # preprocess ran again on more images
        np.savez(tmp_path / f"{name}.npz", x_train=np.zeros((n, 28, 28), np.uint8))
        digests.append(resume.data_digest(tmp_path / f"{name}.npz"))
    identities = [resume.run_identity(cfg, stage=STAGE, dataset="mnist", data=digest, use_gpu=False,
                                      git_commit="abc") for digest in digests]
    assert identities[0] != identities[1]
    interrupted = make_run(store, identities[0], dead_driver(), **{resume.TAG_DATA: digests[0]})
    capsys.readouterr()
    assert resume.take_over(client, experiment_id, stage=STAGE, identity=identities[1], data=digests[1],
                            fresh=False) is None
    assert status(store, interrupted) == ("KILLED", "interrupted")
    (line,) = capsys.readouterr().out.splitlines()
    assert interrupted in line and "trained on other data" in line and "starting fresh" in line


def test_clear_storage_removes_only_that_run(tmp_path):
    for name in ("train-mnist-aaa", "train-mnist-bbb"):
        (tmp_path / name / "checkpoint_0").mkdir(parents=True)
    resume.clear_storage(str(tmp_path), "train-mnist-aaa")
    resume.clear_storage(str(tmp_path), "never-ran")
    assert [p.name for p in tmp_path.iterdir()] == ["train-mnist-bbb"]
