"""What a sweep tries: params.yaml's ``sweep.space`` as Tune domains, the scheduler, and the searcher.

``sweep.search: random`` samples the space (a list is a grid); ``optuna`` lets
Optuna's TPE (through Ray Tune's ``OptunaSearch``) pick each trial from the
results so far, after ``startup_trials`` random ones. Either works with ASHA or
FIFO stopping; PBT explores by itself.
"""

from __future__ import annotations

import pandas as pd

from pipeline.config import Config


def search_space(cfg: Config) -> dict:
    """params.yaml's space as Tune domains: a list is a grid (a choice for PBT and Optuna), the rest distributions."""
    from ray import tune

    sweep = cfg.sweep
    space = {}
    for key, spec in sweep.space.items():
        if isinstance(spec, list):
            grid = sweep.scheduler != "pbt" and sweep.search == "random"
            space[key] = tune.grid_search(spec) if grid else tune.choice(spec)
        else:
            (kind, args), = spec.items()
            space[key] = tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
    return space


def pbt_mutations(cfg: Config) -> dict:
    return {key: spec if isinstance(spec, list) else search_space(cfg)[key] for key, spec in cfg.sweep.space.items()}


def scheduler(cfg: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    sweep = cfg.sweep
    if sweep.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=sweep.epochs, grace_period=sweep.grace_period,
                             reduction_factor=sweep.reduction_factor)
    if sweep.scheduler == "pbt":
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=sweep.perturbation_interval,
                                       hyperparam_mutations=pbt_mutations(cfg))
    return FIFOScheduler()


def search_algorithm(cfg: Config, storage, study_name: str):
    """None for random/grid sampling; else OptunaSearch with a seeded TPE sampler writing to ``storage``."""
    if cfg.sweep.search == "random":
        return None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class ResumableOptunaSearch(OptunaSearch):
        """OptunaSearch for a sweep that may be resumed.

        The study lives in a SQLite file and is saved as it goes; Tune saves its own
        state every few seconds. After a restore Tune may re-run a trial that Optuna
        already closed: its results then are not told to Optuna again (which refuses them).
        """

        def _closed(self, trial_id: str) -> bool:
            trial = self._ot_trials.get(trial_id)  # Ray's map from Tune's trial to Optuna's
            return trial is not None and self._ot_study.get_trials(deepcopy=False)[trial.number].state.is_finished()

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if not self._closed(trial_id):
                super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if not self._closed(trial_id):
                super().on_trial_complete(trial_id, result, error)

    sampler = optuna.samplers.TPESampler(n_startup_trials=cfg.sweep.startup_trials, seed=cfg.sweep.seed)
    return ResumableOptunaSearch(sampler=sampler, storage=storage, study_name=study_name)


def fail_lost_trials(storage, study_name: str) -> int:
    """Mark FAIL the study's trials still RUNNING once the sweep is over; returns how many.

    Such a trial was asked of Optuna just before a killed driver died, and Tune's saved
    state never held it: no process will ever tell Optuna its result.
    """
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    lost = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in lost:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return len(lost)


def optuna_trials(cfg: Config, storage, study_name: str) -> pd.DataFrame:
    """The study's trials, each with ``searched_by``: "tpe" when TPE had startup_trials finished ones to model.

    TPE samples at random until that many trials have finished; which trials had, is
    read from the study's own timestamps.
    """
    import optuna

    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    rows = []
    for trial in trials:
        finished_before = sum(other.datetime_complete is not None and other.datetime_complete <= trial.datetime_start
                              for other in trials)
        rows.append({"number": trial.number, "state": trial.state.name, "value": trial.value, **trial.params,
                     "finished_before": finished_before,
                     "searched_by": "tpe" if finished_before >= cfg.sweep.startup_trials else "random"})
    return pd.DataFrame(rows)


def label_searched_by(table: pd.DataFrame, trials: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The results table with each trial's ``searched_by``, matched to the study's trial by its sampled values."""
    labels = {tuple(row[key] for key in keys): row["searched_by"] for _, row in trials.iterrows()}
    return table.assign(searched_by=[labels.get(tuple(row[key] for key in keys), "") for _, row in table.iterrows()])
