"""Sweep trials sharing a GPU: the config rule, the count of trials at once, real overlap on a declared GPU, OOM.

No GPU is needed: Ray schedules fractional GPU resources by the numbers a node
declares (``ray.init(num_gpus=1)``), and the trials here do not touch CUDA.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from helpers import project_params
from pipeline import cluster, gpu_share, resources, tracking
from pipeline.resources import Node
from pipeline.config import ConfigError, validate
from pipeline.sweep import results_table

SHARED = 2  # trials per GPU in the Ray test
OOM_LR = 0.5  # the trial whose lr_d is this runs out of memory


def sweep_cfg(**sweep):
    params = project_params()
    params["sweep"] = {**params["sweep"], "dataset": "mnist", "space": {"lr_d": [0.1]}, "epochs": 1, **sweep}
    return validate(params)


def gpu_nodes(gpus: int, cpus: float) -> list[Node]:
    return [Node(f"{i:056x}", f"10.0.0.{i}", {"CPU": cpus, "GPU": 1.0}) for i in range(1, gpus + 1)]


def test_trials_per_gpu_sets_each_trials_share_and_refuses_data_parallel_trials():
    assert sweep_cfg().sweep.gpu_share == 0.25  # null: the default, 4 per GPU
    assert sweep_cfg(trials_per_gpu=8).sweep.gpu_share == 0.125
    assert sweep_cfg(num_workers=2).sweep.gpu_share == 1.0  # data-parallel: a whole GPU per worker
    assert sweep_cfg(num_workers=2, trials_per_gpu=1).sweep.gpu_share == 1.0
    assert sweep_cfg(num_workers=2, scheduler="pbt").sweep.gpu_share == 0.25  # PBT trials train in one process
    with pytest.raises(ConfigError) as info:
        sweep_cfg(num_workers=2, trials_per_gpu=4)
    message = str(info.value)
    assert "\n" not in message and message.startswith("params.yaml: sweep: sweep.trials_per_gpu = 4 cannot go "
                                                      "with sweep.num_workers = 2")
    with pytest.raises(ConfigError, match="sweep.trials_per_gpu = 0 is invalid"):
        sweep_cfg(trials_per_gpu=0)


@pytest.mark.parametrize("gpus, cpus, per_gpu, limit, at_once, says", [
    (2, 16, 4, 8, 8, "2 GPU(s) x 4 = 8 trial slots; the cluster holds 8 trial(s) at once"),
    (1, 16, 3, 8, 3, "1 GPU(s) x 3 = 3 trial slots; the cluster holds 3 trial(s) at once"),  # 3 x 1/3 fills it
    (1, 2, 4, 8, 2, "the cluster holds 2 trial(s) at once (each trial also takes 1 CPU)"),
    (2, 16, 4, 2, 2, "the cluster holds 8 trial(s) at once; sweep.max_concurrent_trials = 2 runs 2"),
])
def test_the_resource_check_counts_fractional_gpu_shares(capsys, gpus, cpus, per_gpu, limit, at_once, says):
    cfg = sweep_cfg(trials_per_gpu=per_gpu)
    share = {"CPU": 1.0, "GPU": cfg.sweep.gpu_share}
    assert resources.check_resources(cfg, gpu_nodes(gpus, cpus), workers=0, use_gpu=True, key="ray.use_gpu",
                                   trial=share, trials=limit) == at_once
    assert says in capsys.readouterr().out


def test_an_out_of_memory_error_becomes_one_line_naming_the_knob():
    with pytest.raises(gpu_share.TrialOutOfMemory) as info:
        with gpu_share.memory_share(torch.device("cpu"), 0.25):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 79.19 GiB of which 1.50 GiB is free.")
    assert str(info.value) == ("out of GPU memory within this trial's share, 1/4 of the GPU, set by "
                               "sweep.trials_per_gpu: CUDA out of memory. Tried to allocate 2.00 GiB; "
                               "lower sweep.trials_per_gpu or the batch size")
    assert gpu_share.reason(info.value) == str(info.value)


def stand_in_trial(config: dict, folder: str, share: float) -> None:
    """Holds its GPU share until SHARED trials run at once (or 60 s pass); records when it ran."""
    from ray import tune

    folder, name = Path(folder), f"{config['lr_d']:g}"
    (folder / f"{name}.start").write_text(repr(time.time()))
    with gpu_share.memory_share(torch.device("cpu"), share):
        if config["lr_d"] == OOM_LR:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has little left.")
        deadline = time.time() + 60
        while time.time() < deadline and sum(not (folder / f"{p.stem}.end").exists()
                                             for p in folder.glob("*.start")) < SHARED:
            time.sleep(0.1)
        time.sleep(1.0)
    (folder / f"{name}.end").write_text(repr(time.time()))
    tune.report({"fid": config["lr_d"], "epoch": 1, "status": "completed"})


@pytest.mark.integration
def test_trials_share_one_declared_gpu_at_once_and_an_oom_trial_fails_alone(tmp_path, capsys):
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune

    lrs = [0.1, 0.2, 0.3, 0.4, OOM_LR]
    cfg = sweep_cfg(trials_per_gpu=SHARED, space={"lr_d": lrs}, max_concurrent_trials=4)
    share = {"CPU": 1.0, "GPU": cfg.sweep.gpu_share}
    folder = tmp_path / "trials"
    folder.mkdir()
    # CPUs for 4 trials at once: the one declared GPU is what holds them to SHARED.
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, logging_level="warning",
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    try:
        at_once = resources.check_resources(cfg, cluster.alive_nodes(), workers=0, use_gpu=True, key="ray.use_gpu",
                                          trial=share, trials=cfg.sweep.max_concurrent_trials)
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(stand_in_trial, folder=str(folder), share=share["GPU"]),
                                {key.lower(): amount for key, amount in share.items()}),
            param_space={"lr_d": tune.grid_search(lrs)},
            tune_config=tune.TuneConfig(metric="fid", mode="min", max_concurrent_trials=at_once, reuse_actors=True),
            run_config=tune.RunConfig(name="shared", storage_path=str(tmp_path / "ray"), verbose=0))
        results = tuner.fit()
    finally:
        ray.shutdown()
    assert at_once == SHARED and "1 GPU(s) x 2 = 2 trial slots" in capsys.readouterr().out

    spans = {p.stem: (float(p.read_text()), float((folder / f"{p.stem}.end").read_text()))
             for p in folder.glob("*.start") if (folder / f"{p.stem}.end").exists()}
    assert len(spans) == 4  # every trial but the OOM one finished
    most = max(sum(start <= moment < end for start, end in spans.values()) for moment, _ in spans.values())
    assert most == SHARED  # SHARED trials really trained at the same time on the one GPU, never more

    table = results_table(results, cfg, {}, {})
    failed = table[table["status"] == "failed"]
    assert list(failed["lr_d"]) == [OOM_LR] and set(table[table["lr_d"] != OOM_LR]["status"]) == {"completed"}
    reason = failed["error"].item()
    assert reason.startswith("out of GPU memory within this trial's share, 1/2 of the GPU, set by "
                             "sweep.trials_per_gpu: CUDA out of memory. Tried to allocate 2.00 GiB")
    table.drop(columns=["checkpoint"]).to_csv(tmp_path / "results.csv", index=False)  # as the sweep writes it
    assert reason in (tmp_path / "results.csv").read_text()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the child run ends as the sweep ends it
    run_id = client.create_run(client.create_experiment("shared")).info.run_id
    tracking.end_run(client, run_id, "failed", reason)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags[tracking.TAG_FAILURE] == reason
