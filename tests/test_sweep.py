"""The sweep stage: real `dvc repro sweep` with Ray Tune, ASHA, Ray Train trials and MLflow parent/child runs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess

import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import (HUGE_LR, UNUSED_MIRROR, copy_repo, end_process_tree, project_params, run_cmd, sweep_params,
                      tool_env, wait_until)
from pipeline.config import ConfigError, apply_overrides, validate
from pipeline.search import fail_lost_trials, pbt_mutations, search_space
from pipeline.sweep import trial_config

BATCHES_PER_EPOCH = 300 // 64  # the fixture's 300 training images, batch 64, one worker


@pytest.mark.integration
def test_dvc_repro_sweep_ranks_trials_and_links_mlflow_runs(swept_repo):
    repo, stdout = swept_repo
    assert "dvc exp run -S train.lr_d=" in stdout

    table = pd.read_csv(repo / "sweep/results.csv")
    assert len(table) == 4
    assert {"trial_id", "status", "lr_d", "lr_g", "d_steps", "g_steps", "fid", "kid", "class_coverage",
            "epochs_run", "wall_seconds", "mlflow_run_id"} <= set(table.columns)
    statuses = dict(zip(table["lr_d"], table["status"]))
    assert statuses[HUGE_LR] == "diverged"  # recorded, and the others still finished
    assert set(table["status"]) <= {"completed", "stopped_early", "diverged"}
    assert (table["status"] == "completed").sum() >= 1
    usable = table[table["status"] != "diverged"]
    assert table.iloc[0]["fid"] == usable["fid"].min()  # the best row has the best metric

    summary = json.loads((repo / "sweep/summary.json").read_text())
    assert summary["trials"] == 4 and summary["diverged"] == 1
    assert summary["stopped_early"] == (table["status"] == "stopped_early").sum()
    assert summary["best_fid"] == pytest.approx(usable["fid"].min())
    assert 0 <= summary["budget_saved"] < 1
    assert summary["epochs_run"] == table["epochs_run"].sum()
    metrics = json.loads((repo / "metrics/sweep.json").read_text())  # the DVC metric: what users compare
    assert metrics == {"best_fid": pytest.approx(summary["best_fid"], rel=1e-3), "trials": 4}

    best = yaml.safe_load((repo / "sweep/best_params.yaml").read_text())
    assert set(best["train"]) == {"lr_d", "lr_g", "d_steps", "g_steps"}
    validate(apply_overrides(yaml.safe_load((repo / "params.yaml").read_text()),
                             {f"train.{k}": v for k, v in best["train"].items()}))
    for figure in ("metric_vs_lr.png", "best_vs_worst.png"):
        assert (repo / "sweep" / figure).read_bytes().startswith(b"\x89PNG")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ganpipe-mnist")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("dvc.stage") == "sweep" and "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name.startswith("sweep-mnist-")
    parent = parents[0]
    children = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(children) == 4
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "results.csv", "best_params.yaml", "metric_vs_lr.png", "best_vs_worst.png", "search_space.yaml"}

    for row in table.itertuples():
        child = children[row.mlflow_run_id]
        assert child.data.tags["ray.trial_id"] == row.trial_id
        for key in ("lr_d", "lr_g", "d_steps", "g_steps"):  # the row's params are what the child recorded
            assert float(child.data.params[f"train.{key}"]) == pytest.approx(getattr(row, key))
        assert child.data.params["train.epochs"] == "3"
        expected_status = "FAILED" if row.status == "diverged" else "FINISHED"
        assert child.info.status == expected_status and child.data.tags["ganpipe.status"] == row.status
        if row.status == "diverged":
            continue
        # Every sampled value reached the engine: its optimizers' lrs and exact update counts.
        metrics = child.data.metrics
        assert metrics["opt/lr_d"] == pytest.approx(row.lr_d) and metrics["opt/lr_g"] == pytest.approx(row.lr_g)
        iterations_per_epoch = BATCHES_PER_EPOCH // row.d_steps  # each iteration eats d_steps real batches
        history = {key: {m.step: m.value for m in client.get_metric_history(row.mlflow_run_id, f"opt/{key}")}
                   for key in ("d_updates", "g_updates")}
        assert history["d_updates"]
        for epoch, d_updates in history["d_updates"].items():
            assert d_updates == epoch * iterations_per_epoch * row.d_steps
            assert history["g_updates"][epoch] == epoch * iterations_per_epoch * row.g_steps
        assert len(client.get_metric_history(row.mlflow_run_id, "quality/fid")) == row.epochs_run

    # ASHA stopped exactly the trials its rule stops, given the FIDs the trials reported, in the order they ran.
    started = sorted(table.itertuples(), key=lambda row: children[row.mlflow_run_id].info.start_time)
    fids = {row.trial_id: [math.inf] if row.status == "diverged" else  # a diverged trial reports fid = inf
            [m.value for m in sorted(client.get_metric_history(row.mlflow_run_id, "quality/fid"), key=lambda m: m.step)]
            for row in started}
    stops = asha_stops([(row.trial_id, fids[row.trial_id]) for row in started], milestones=(1, 2), reduction=2)
    diverged = set(table.loc[table["status"] == "diverged", "trial_id"])  # ASHA stops it too; diverged wins
    assert set(table.loc[table["status"] == "stopped_early", "trial_id"]) == stops - diverged, fids
    assert (table.loc[table["status"] == "stopped_early", "epochs_run"] < 3).all()


def asha_stops(trials: list[tuple[str, list[float]]], milestones: tuple[int, ...], reduction: int) -> set[str]:
    """The trials that Ray's ASHA (one bracket, metric minimized) stops, run one after another.

    At each milestone a trial is stopped if its reward (-fid) is below the (1 - 1/reduction) percentile of
    the rewards that the trials before it recorded there.
    """
    recorded: dict[int, list[float]] = {milestone: [] for milestone in milestones}
    stopped = set()
    for trial_id, trial_fids in trials:
        for epoch, fid in enumerate(trial_fids, start=1):
            if epoch not in recorded:
                continue
            with np.errstate(invalid="ignore"):
                cutoff = np.nanpercentile(recorded[epoch], (1 - 1 / reduction) * 100) if recorded[epoch] else None
            recorded[epoch].append(-fid)
            if cutoff is not None and -fid < cutoff:
                stopped.add(trial_id)
                break
    return stopped


@pytest.mark.integration
def test_killed_optuna_sweep_resumes_without_training_finished_trials_again(evaluated_repo, tmp_path):
    """sweep.search: optuna with one random startup trial, SIGKILLed once a trial finished, then run again.

    The re-run restores the Tune experiment and the Optuna study: the finished trial is not
    trained again, the rest continue, and the later trials come from TPE's model of the results.
    """
    params = sweep_params(UNUSED_MIRROR)
    params["train"]["epochs"] = 1
    params["sweep"].update(search="optuna", startup_trials=1, scheduler="fifo", num_samples=3, epochs=2,
                           space={"lr_d": {"loguniform": [0.005, 0.05]}, "lr_g": {"loguniform": [0.005, 0.05]},
                                  "d_steps": [1, 2]})
    repo = copy_repo(evaluated_repo, tmp_path, params)
    # Tune saves its experiment state every 10 s or more by default: a whole sweep could end in between.
    # Saved every second, the first finished trial shows while the others still have to run.
    env = {**tool_env(), "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    log = tmp_path / "killed-sweep.log"
    with open(log, "w") as output:
        process = subprocess.Popen(["dvc", "repro", "sweep"], cwd=repo, env=env, text=True, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Tune's saved experiment state records the first finished trial: kill the whole process group then.
        finished = lambda: any("TERMINATED" in path.read_text()  # noqa: E731
                               for path in (repo / "ray_results").glob("sweep-mnist-*/experiment_state-*.json"))
        wait_until(finished, 600, "a finished trial in the sweep's saved state", process)
        assert process.poll() is None, f"the sweep ended before the kill:\n{log.read_text()[-4000:]}"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        end_process_tree(process)
    rerun = run_cmd(["dvc", "repro", "sweep"], repo)
    assert "resuming the interrupted sweep" in rerun.stdout, f"{log.read_text()[-3000:]}\n---\n{rerun.stdout[-3000:]}"

    table = pd.read_csv(repo / "sweep/results.csv")
    assert len(table) == 3 and table["trial_id"].is_unique and set(table["status"]) == {"completed"}
    # max_concurrent_trials 1: trial 1 finished before TPE was asked for trials 2 and 3
    assert sorted(table["searched_by"]) == ["random", "tpe", "tpe"]
    assert set(table["d_steps"]) <= {1, 2}  # a list is a choice for Optuna, not a grid

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ganpipe-mnist").experiment_id])
    parents = [r for r in runs if r.data.tags.get("dvc.stage") == "sweep" and "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the same parent run, reused
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    in_table = set(table["mlflow_run_id"])
    lost = [child for child in children if child.info.run_id not in in_table]
    assert len(children) - len(lost) == 3
    # A trial that had started when the kill landed, before Tune saved it, is one Tune no longer knows: its
    # run ended with the killed driver, and the re-run does not pick it up.
    for run in lost:
        assert run.info.status == "KILLED" and run.data.tags["ganpipe.status"] == "interrupted"
    assert {r.info.status for r in runs if r not in lost} == {"FINISHED"}  # nothing left RUNNING
    first = table.loc[table["searched_by"] == "random", "mlflow_run_id"].item()
    fids = client.get_metric_history(first, "quality/fid")
    assert sorted(m.step for m in fids) == [1, 2]  # trained once: no epoch logged twice

    study = pd.read_csv(client.download_artifacts(parents[0].info.run_id, "optuna_trials.csv", str(tmp_path)))
    complete = study[study["state"] == "COMPLETE"]
    assert len(complete) == 3 and list(study["number"]) == list(range(len(study)))
    # A trial Optuna handed out just before the kill, which Tune never saved, ends FAIL, not RUNNING forever.
    assert set(study["state"]) <= {"COMPLETE", "FAIL"} and (study["state"] == "FAIL").sum() <= 1
    assert sorted(complete["value"]) == pytest.approx(sorted(table["fid"]))  # Optuna was told every trial's FID


def test_trials_left_running_in_the_study_end_fail(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="sweep-mnist-x", storage=storage)
    study.tell(study.ask(), 1.0)
    study.ask()  # handed out, then its driver died
    assert fail_lost_trials(storage, "sweep-mnist-x") == 1
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "FAIL"]
    assert fail_lost_trials(storage, "sweep-mnist-x") == 0


def test_trial_config_applies_every_sampled_value():
    params = project_params()
    params["sweep"] = sweep_params("http://unused/")["sweep"]
    cfg = validate(params)
    sampled = {"lr_g": 0.0123, "lr_d": 0.0456, "d_steps": 3, "g_steps": 2}
    trial = trial_config(params, cfg.sweep, sampled)
    assert (trial.train.lr_g, trial.train.lr_d, trial.train.d_steps, trial.train.g_steps) == (0.0123, 0.0456, 3, 2)
    assert trial.train.epochs == 3 and trial.ray.num_workers == 1 and trial.train.checkpoint_every == 1

    space = search_space(cfg)
    assert space["lr_d"] == {"grid_search": [0.01, 0.02, 0.05, HUGE_LR]}
    assert space["lr_g"].lower == 0.005 and space["lr_g"].upper == 0.05
    assert space["d_steps"].categories == [1, 2]
    pbt_cfg = validate(apply_overrides(params, {"sweep.scheduler": "pbt"}))
    assert pbt_mutations(pbt_cfg)["lr_d"] == [0.01, 0.02, 0.05, HUGE_LR]  # PBT explores the grid's values


@pytest.mark.parametrize("space, message", [
    ({"lr_g": []}, "sweep.space.lr_g: an empty list cannot be sampled"),
    ({"lr_g": [-1e-3]}, "sweep.space.lr_g: -0.001 is not a valid train.lr_g: Input should be greater than 0"),
    ({"lr_d": {"loguniform": [1e-3, 1e-4]}}, "sweep.space.lr_d.loguniform: needs [low, high] of finite numbers, low < high"),
    ({"d_steps": {"choice": [0, 1]}}, "sweep.space.d_steps: 0 is not a valid train.d_steps"),
    ({"lr_g": {"normal": [0, 1]}}, "sweep.space.lr_g: expected a list or one of {choice, loguniform, uniform"),
    ({"beta": [0.5]}, "sweep.space.beta = 'beta' is invalid: Input should be 'lr_g', 'lr_d'"),
])
def test_unsampleable_space_is_rejected_before_ray_starts(space, message):
    params = project_params()
    params["sweep"] = {**params["sweep"], "dataset": "mnist", "space": space}
    with pytest.raises(ConfigError) as info:
        validate(params)
    assert message in str(info.value)
