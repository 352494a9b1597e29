"""sweep: Ray Tune over learning rates and D:G step ratios, ranked by sample quality.

A trial with one worker (``sweep.num_workers: 1``, and every PBT trial) trains
inside its own Tune function process, reporting and checkpointing through Tune:
no worker group to start, so a trial costs little beyond its training. A
data-parallel trial (``num_workers`` > 1) fits a TorchTrainer of its own, with
TuneReportCallback forwarding rank 0's per-epoch metrics. Either way ASHA can
stop a trial early on its FID, and PBT can hand checkpoints from trial to trial.

MLflow: a parent run ``sweep-<dataset>-<identity>`` with one child run per trial.
DVC: sweep/results.csv, sweep/best_params.yaml, sweep/summary.json, two figures,
and the few figures users compare across experiments as the metric metrics/sweep.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from pipeline import cluster, driver, gpu_share, resources, spool, tracking
from pipeline.config import Config, ConfigError, apply_overrides, params_hash, sweep_param, validate
from pipeline.artifacts import load_processed
from pipeline.progress import on_terminal, sweep_callback, trial_count
from pipeline.sweep_figures import best_vs_worst, metric_figure
from pipeline.search import (fail_lost_trials, label_searched_by, optuna_trials, scheduler, search_algorithm,
                             search_space)
from pipeline.loop import LoopRun, fit, run_loop, storage_path

OUT = Path("sweep")
SUMMARY_METRICS = ("fid", "kid", "class_coverage")
CHECKPOINT_PATH_KEY = "checkpoint_path"  # where TuneReportCallback puts a trial's latest checkpoint


def output_paths(root: Path) -> dict[str, Path]:
    return {"results": root / OUT / "results.csv", "best": root / OUT / "best_params.yaml",
            "figure": root / OUT / "metric_vs_lr.png", "grid": root / OUT / "best_vs_worst.png",
            "summary": root / OUT / "summary.json", "metrics": root / "metrics" / "sweep.json"}


def trial_config(raw_params: dict, sweep_cfg, sampled: dict) -> Config:
    """The trial's full config: params.yaml with the sampled values and the sweep's budget applied."""
    overrides = {sweep_param(key): value for key, value in sampled.items()}
    overrides.update({"train.epochs": sweep_cfg.epochs, "train.checkpoint_every": 1,
                      "ray.num_workers": sweep_cfg.num_workers})
    return validate(apply_overrides(raw_params, overrides))


class TuneTrialWorker:
    """A single-process trial: Tune's reports and checkpoints, no DDP."""

    rank, world = 0, 1

    def __init__(self, use_gpu: bool):
        # Ray shows the trial its GPU alone (CUDA_VISIBLE_DEVICES), so it is device 0; torch's memory
        # functions (the trial's share, its peak) refuse a CUDA device without an index.
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        if use_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)  # a reused trial process reports this trial's own peak

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def get_checkpoint(self):
        from ray import tune

        return tune.get_checkpoint()

    def report(self, metrics: dict, folder: Path | None = None) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)


def in_process(sweep) -> bool:
    """Whether a trial trains in its own Tune process: one worker needs no worker group (PBT is single-process)."""
    return sweep.scheduler == "pbt" or sweep.num_workers == 1


def run_trial(sampled: dict, setup: dict) -> None:
    """One Tune trial, on any node. PBT may start it again with explored values and another trial's checkpoint.

    Everything it needs comes in ``setup`` (through Ray): nothing is read from the head's disk.
    """
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    raw_params = setup["params"]
    cfg = trial_config(raw_params, validate(raw_params).sweep, sampled)
    cluster.use_credentials(setup["inputs"])
    client = spool.SpooledClient(setup["tracking_uri"], spool.spool_root(setup["storage"]))
    run_id = _child_run(client, cfg, setup, trial_id)
    # Every (re)start records the values this trial trains with: PBT changes them as it explores.
    tracking.log_metrics(client, run_id, {f"hparam/{key}": float(value) for key, value in sampled.items()
                                          if isinstance(value, (int, float))}, step=0)
    dataset, use_gpu = cfg.sweep_dataset, setup["use_gpu"]
    if in_process(cfg.sweep):
        run = LoopRun(cfg, dataset, inputs=setup["inputs"], mlflow_run_id=run_id, tracking_uri=setup["tracking_uri"],
                      spool_root=str(spool.spool_root(setup["storage"])), use_gpu=use_gpu,
                      diverged_metrics=setup["diverged_metrics"], estimate=setup["estimate"])
        worker = TuneTrialWorker(use_gpu)
        with gpu_share.memory_share(worker.device, cfg.sweep.gpu_share):
            run_loop(run, worker)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    fit(cfg, dataset, storage=setup["storage"], inputs=setup["inputs"], use_gpu=use_gpu, mlflow_run_id=run_id,
        tracking_uri=setup["tracking_uri"], ray_run_name=f"{setup['name']}-{trial_id}",
        callbacks=[TuneReportCallback()], diverged_metrics=setup["diverged_metrics"], estimate=setup["estimate"])


def _child_run(client, cfg: Config, setup: dict, trial_id: str) -> str:
    """This trial's MLflow run under the sweep's parent; a restarted trial reuses its own."""
    try:
        existing = client.search_runs(
            [setup["experiment_id"]],
            filter_string=f"tags.mlflow.parentRunId = '{setup['parent_run_id']}' and tags.`ray.trial_id` = '{trial_id}'")
    except Exception as err:
        if not spool.is_transport_failure(err):
            raise
        existing = []  # the server is away: a new run, created when it is back
    if existing:
        if existing[0].info.status != "RUNNING":  # ended as interrupted with its sweep's driver
            client.update_run(existing[0].info.run_id, status="RUNNING")
        return existing[0].info.run_id
    _, run_id = tracking.start_run(
        cfg, cfg.sweep_dataset, Path(setup["root"]), stage="sweep", ray_run_name=f"{setup['name']}-{trial_id}",
        params_hash=setup["params_hash"], parent_run_id=setup["parent_run_id"],
        name=f"{trial_id} {tracking.run_name(cfg)}", extra_tags={"ray.trial_id": trial_id, **setup["lineage"]},
        uri=setup["tracking_uri"], git=setup["git"], client=client, experiment_id=setup["experiment_id"])
    return run_id


def trial_status(result, budget: int) -> str:
    metrics = result.metrics or {}
    if result.error is not None:
        return "failed"
    if metrics.get("status") in ("diverged", "stopped_early"):
        return metrics["status"]
    return "completed" if metrics.get("epoch", 0) >= budget else "stopped_early"


def results_table(results, cfg: Config, children: dict[str, str], epochs_trained: dict[str, int]) -> pd.DataFrame:
    """One row per trial, best first by the sweep metric; failed and diverged trials last.

    ``epochs_trained`` counts the epochs each child run really logged: a stopped
    trial may finish an epoch or two after the scheduler's decision reaches it.
    """
    sweep = cfg.sweep
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or _trial_id_from_path(result.path)
        row = {"trial_id": trial_id, "status": trial_status(result, sweep.epochs),
               **{key: result.config.get(key) for key in sweep.space}}
        for key in dict.fromkeys((*SUMMARY_METRICS, sweep.metric)):
            value = metrics.get(key, math.nan)
            row[key] = value if row["status"] not in ("diverged", "failed") else math.nan
        run_id = children.get(trial_id, "")
        # How the trial trained: in a CUDA graph or eagerly (and why), and its own peak GPU memory (null on a CPU).
        row.update({key: metrics.get(key) for key in ("cuda_graph", "graph_fallback_reason", "peak_memory_gib")})
        row.update(epochs_run=max(metrics.get("epoch", 0), epochs_trained.get(run_id, 0)),
                   wall_seconds=round(metrics.get("time_total_s", math.nan), 2),
                   mlflow_run_id=run_id, error=gpu_share.reason(result.error)[:300] if result.error else "",
                   checkpoint=_latest_checkpoint(result))
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values(sweep.metric, ascending=sweep.mode == "min", na_position="last").reset_index(drop=True)


def _trial_id_from_path(path: str) -> str:
    # Tune names trial folders <function>_<trial_id>_<index>_<params>.
    parts = Path(path).name.split("_")
    return next((f"{a}_{b}" for a, b in zip(parts, parts[1:]) if b.isdigit() and len(b) == 5), Path(path).name)


def _latest_checkpoint(result) -> str:
    if result.checkpoint is not None:  # in-process trials report through Tune itself
        return result.checkpoint.path
    return (result.metrics or {}).get(CHECKPOINT_PATH_KEY, "")


def run(cfg: Config, root: Path = Path("."), fresh: bool = False) -> pd.DataFrame:
    """Sweep, or resume the interrupted sweep with the same identity (``fresh``: start over)."""
    sweep, dataset, root = cfg.sweep, cfg.sweep_dataset, root.resolve()
    if dataset not in cfg.data.datasets:
        raise ConfigError(f"params.yaml: sweep.dataset = {dataset!r} is not in data.datasets "
                          f"(allowed: {', '.join(cfg.data.datasets)}, or null for the first)")
    from ray import tune

    # Every check before the parent run exists: a bad setting leaves nothing RUNNING.
    arrays = load_processed(dataset, root)
    single = in_process(sweep)
    workers = 1 if single else sweep.num_workers
    batch_key = "sweep.space.batch_size" if "batch_size" in sweep.space else "train.batch_size"
    for batch_size in sweep.candidate_values().get("batch_size", [cfg.train.batch_size]):
        resources.check_batch(int(batch_size), workers, len(arrays["x_train"]), batch_key=batch_key,
                            workers_key="sweep.num_workers", per_worker=cfg.train.batch_scaling == "per_worker")
    uri, storage = tracking.tracking_uri(cfg, root), storage_path(cfg, root)
    nodes = cluster.start(cfg)
    use_gpu = resources.resolve_use_gpu(cfg.ray.use_gpu, nodes)
    # A data-parallel trial holds a token CPU share beside its TorchTrainer's workers; the others train themselves.
    # sweep.trials_per_gpu one-worker trials share each GPU (Ray's fractional resources).
    share = {"CPU": 1.0, "GPU": sweep.gpu_share * use_gpu} if single else {"CPU": resources.TRIAL_CPU_SHARE}
    concurrent = resources.check_resources(cfg, nodes, workers=0 if single else workers, use_gpu=use_gpu,
                                         key="ray.use_gpu" if single else "sweep.num_workers", trial=share,
                                         trials=sweep.max_concurrent_trials)
    if concurrent < sweep.max_concurrent_trials:
        # More would wait for workers that only free up when a trial ends, and time out meanwhile.
        print(f"sweep: the cluster holds {concurrent} trial(s) at a time; running {concurrent} at once "
              f"instead of sweep.max_concurrent_trials = {sweep.max_concurrent_trials}")
    cluster.check_shared(uri, storage, nodes)
    inputs = cluster.put_inputs(dataset, root, arrays)

    parent = driver.open_run(cfg, dataset, root, stage="sweep", storage=storage, uri=uri, use_gpu=use_gpu,
                             fresh=fresh, named=True)
    client, parent_id, name, git = parent.client, parent.run_id, parent.ray_run_name, parent.git
    if parent.resumed:
        print(f"sweep: resuming the interrupted sweep {name} (MLflow parent run {parent_id}): finished trials "
              "are kept, unfinished ones continue from their checkpoints")
    else:
        _clear_study(root, name)
        client.log_dict(parent_id, sweep.model_dump(mode="json"), "search_space.yaml")
        print(f"sweep: MLflow parent run {parent_id} ({name}) in {uri}")
    study_storage = _study_storage(cfg, root, name)
    worst = math.inf if sweep.mode == "min" else -math.inf
    grid = sweep.scheduler != "pbt" and sweep.search == "random"  # as search_space() builds it
    trials = trial_count(sweep.space, sweep.num_samples, grid)
    setup = {"params": cfg.model_dump(mode="json"), "root": str(root), "tracking_uri": uri, "name": name,
             "storage": storage, "inputs": inputs, "use_gpu": use_gpu, "git": git,
             "parent_run_id": parent_id, "experiment_id": parent.experiment_id,
             "params_hash": params_hash(root / "params.yaml"), "diverged_metrics": {sweep.metric: worst},
             "lineage": tracking.lineage_tags(),  # trials may run where DVC_EXP_NAME is not set
             "estimate": {"stage": "sweep", "runs": trials, "at_once": concurrent, "once_key": f"estimate-{name}"}}
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                    {key.lower(): amount for key, amount in share.items()})
    with driver.ending(cfg, parent, storage, "sweep"):
        experiment_path = f"{storage.rstrip('/')}/{name}"
        if parent.resumed and tune.Tuner.can_restore(experiment_path):
            # Finished trials keep their results; unfinished and errored ones continue from their checkpoints.
            tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, param_space=search_space(cfg))
        else:
            searcher = search_algorithm(cfg, study_storage, name)
            # On a terminal a bar of trials done and the best metric replaces Tune's periodic status tables.
            progress = [sweep_callback(trials, sweep.metric, sweep.mode)] if on_terminal() else []
            tuner = tune.Tuner(
                trainable, param_space=search_space(cfg),
                tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler(cfg),
                                            search_alg=searcher, num_samples=sweep.num_samples,
                                            max_concurrent_trials=concurrent,
                                            # A one-worker trial's process (torch, MLflow, the inputs pulled
                                            # from the object store) serves the next trial too.
                                            reuse_actors=in_process(sweep)),
                run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=progress,
                                          verbose=0 if progress else 1),
            )
        results = tuner.fit()
        # What the trials spooled through an outage must be in MLflow before their epochs are counted.
        spool.deliver_all(uri, spool.spool_root(storage), cfg.mlflow.flush_timeout_s,
                          report=lambda line: print(f"sweep: {line}", flush=True))
        children = {run.data.tags.get("ray.trial_id"): run.info.run_id for run in client.search_runs(
            [setup["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")}
        # Distinct epochs: a PBT trial that exploits another's checkpoint logs some epochs again.
        epochs_trained = {run_id: len({m.step for m in client.get_metric_history(run_id, f"quality/{sweep.metric}")})
                          for run_id in children.values()}
        table = results_table(results, cfg, children, epochs_trained)
        if study_storage is not None:
            if lost := fail_lost_trials(study_storage, name):
                print(f"sweep: {lost} Optuna trial(s) lost with the killed driver marked FAIL in the study", flush=True)
            trials = optuna_trials(cfg, study_storage, name)
            table = label_searched_by(table, trials, list(sweep.space))
            client.log_text(parent_id, trials.to_csv(index=False), "optuna_trials.csv")
        for row in table.itertuples():
            if row.mlflow_run_id:
                tracking.end_run(client, row.mlflow_run_id, row.status, row.error)
        summary = _write_outputs(cfg, table, root)
        _log_parent(client, parent_id, root, summary)
    return table


STUDY_FOLDER = Path(".ganpipe") / "optuna"  # beside the project: survives the driver, not a DVC output


def _study_storage(cfg: Config, root: Path, name: str):
    """A SQLite file for Optuna's study, kept for a resumed sweep: the searcher runs in the driver's process."""
    if cfg.sweep.search != "optuna":
        return None
    import optuna

    (root / STUDY_FOLDER).mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(f"sqlite:///{root / STUDY_FOLDER / name}.db")


def _clear_study(root: Path, name: str) -> None:
    (root / STUDY_FOLDER / f"{name}.db").unlink(missing_ok=True)


def _write_outputs(cfg: Config, table: pd.DataFrame, root: Path) -> dict:
    sweep, paths = cfg.sweep, output_paths(root)
    paths["results"].parent.mkdir(parents=True, exist_ok=True)
    paths["metrics"].parent.mkdir(parents=True, exist_ok=True)
    table.drop(columns=["checkpoint"]).to_csv(paths["results"], index=False)  # "error": why a trial failed
    usable = table[table["status"].isin(["completed", "stopped_early"]) & np.isfinite(table[sweep.metric])]
    if usable.empty:
        raise RuntimeError(f"no trial finished with a finite {sweep.metric}; see {paths['results']}")
    best = usable.iloc[0]
    overrides = {key: _plain(best[key]) for key in sweep.space}
    best_params: dict[str, dict] = {}  # by section: model.conditional beside the train keys
    for key, value in overrides.items():
        best_params.setdefault(sweep_param(key).split(".")[0], {})[key] = value
    paths["best"].write_text(yaml.safe_dump(best_params, sort_keys=False))
    metric_figure(table, sweep.metric, paths["figure"])
    best_vs_worst(table, paths["grid"])
    epochs_run = table["epochs_run"].sum()
    summary = {
        "dataset": cfg.sweep_dataset, "metric": sweep.metric, "mode": sweep.mode,
        f"best_{sweep.metric}": float(best[sweep.metric]),
        "best_trial_id": best["trial_id"], "best_mlflow_run_id": best["mlflow_run_id"], "trials": len(table),
        "stopped_early": int((table["status"] == "stopped_early").sum()),
        "diverged": int((table["status"] == "diverged").sum()), "failed": int((table["status"] == "failed").sum()),
        "epochs_run": int(epochs_run), "budget_saved": round(1 - epochs_run / (len(table) * sweep.epochs), 4),
    }
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    tracking.write_dvc_metrics(paths["metrics"], {key: summary[key] for key in (f"best_{sweep.metric}", "trials")})
    print(table.drop(columns=["checkpoint", "error"]).to_string(index=False))
    command = " ".join(f"-S {sweep_param(key)}={value}" for key, value in overrides.items())
    print(f"\nbest {sweep.metric} {best[sweep.metric]:.4f} (trial {best['trial_id']}); "
          f"ASHA/PBT saved {summary['budget_saved']:.0%} of the epoch budget.\nTrain it:  dvc exp run {command}")
    return summary


def _plain(value):
    """numpy scalars -> Python numbers, so YAML and `dvc exp run -S` read them back."""
    return value.item() if hasattr(value, "item") else value


def _log_parent(client, parent_id: str, root: Path, summary: dict) -> None:
    paths = output_paths(root)
    for key in ("results", "best", "figure", "grid"):
        if paths[key].exists():
            client.log_artifact(parent_id, str(paths[key]))
    tracking.log_metrics(client, parent_id, {k: v for k, v in summary.items() if isinstance(v, (int, float))}, step=0)
