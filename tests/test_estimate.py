"""The CPU time estimate (pipeline/estimate.py): its arithmetic, its line, and that it is said once."""

from __future__ import annotations

import torch

from pipeline import estimate

# The default on MNIST with 2 workers: 60,000 images / (32 per step) = 1875 iterations an epoch.
ITERATIONS, EPOCHS = 1875, 10


def test_expected_seconds_multiplies_out_epochs_runs_and_waves_of_concurrent_trials():
    assert estimate.expected_seconds(0.2, ITERATIONS, EPOCHS) == 3750
    assert estimate.expected_seconds(0.2, ITERATIONS, EPOCHS, runs=2) == 7500
    # 8 trials 2 at a time: 4 waves; 3 trials 2 at a time: 2 waves.
    assert estimate.expected_seconds(0.2, ITERATIONS, 5, runs=8, at_once=2) == 7500
    assert estimate.expected_seconds(0.2, ITERATIONS, 5, runs=3, at_once=2) == 3750


def test_duration_reads_in_hours_minutes_or_seconds():
    assert estimate.duration(7500) == "2 h 05 min"
    assert estimate.duration(3600) == "1 h 00 min"
    assert estimate.duration(840) == "14 min"
    assert estimate.duration(40) == "40 s"


def test_the_train_line_gives_the_stage_the_datasets_and_the_quick_command():
    line = estimate.message({"stage": "train@mnist", "runs": 2}, 0.2, ITERATIONS, EPOCHS)
    assert line.startswith("train@mnist on this CPU: about 1 h 02 min of training (10 epochs of 6 min)")
    assert "2 h 05 min for the 2 datasets in data.datasets" in line
    assert line.endswith("stop this and run `make demo`.")


def test_the_sweep_line_counts_trials_epochs_and_concurrency():
    plan = {"stage": "sweep", "runs": 8, "at_once": 2}
    line = estimate.message(plan, 0.2, ITERATIONS, 5)
    assert line.startswith("sweep on this CPU: up to 2 h 05 min of training (8 trials x 5 epochs of 6 min, 2 at a time")
    assert "`make demo`" in line


def test_a_short_run_says_nothing():
    assert estimate.message({"stage": "train@mnist", "runs": 1}, 0.01, 156, 3) is None  # 4.7 s
    assert estimate.message({"stage": "sweep", "runs": 4, "at_once": 2}, 0.5, 156, 1) is None  # 156 s


def test_first_window_times_the_second_window_says_once_and_passes_every_row_on(monkeypatch):
    clock = iter([100.0, 130.0, 999.0, 999.0])  # read-backs at steps 50, 100, 150, 200
    monkeypatch.setattr(estimate.time, "perf_counter", lambda: next(clock))
    said, seen = [], []
    window = estimate.FirstWindow({"stage": "train@mnist", "runs": 1}, ITERATIONS, EPOCHS,
                                  then=lambda row: seen.append(row["step"]), say=said.append)
    for step in (50, 100, 150, 200):
        window({"step": step, "loss_d": 1.0, "loss_g": 1.0})
    # 30 s for 50 iterations: 0.6 s each, 1125 s an epoch, 3 h 08 min for 10 epochs.
    assert len(said) == 1 and said[0].startswith("train@mnist on this CPU: about 3 h 08 min of training")
    assert seen == [50, 100, 150, 200]


def test_the_hook_is_only_set_on_a_cpu_with_a_plan():
    then = print
    plan = {"stage": "train@mnist", "runs": 1}
    assert estimate.hook(None, torch.device("cpu"), ITERATIONS, EPOCHS, then=then) is then
    assert estimate.hook(plan, torch.device("cuda"), ITERATIONS, EPOCHS, then=then) is then
    assert isinstance(estimate.hook(plan, torch.device("cpu"), ITERATIONS, EPOCHS, then=then), estimate.FirstWindow)
