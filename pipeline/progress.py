"""Progress on the terminal: rank 0's bar per epoch, saved checkpoints, and the sweep's trials done out of total.

Both show only when the driver's stdout and stderr are terminals, so CI and
`dvc repro` logs stay line-oriented. The epoch bar is fed by the engine's
read-backs (every ``train.log_every`` iterations): it adds no host sync.
Rank 0 may run on another node than the driver, so its bar is Ray's tqdm: the
worker prints its state, and the driver draws it.
"""

from __future__ import annotations

import math
import sys
import time


def on_terminal() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


class EpochBar:
    """One epoch on rank 0: images done, img/s, ETA, and the iteration and losses of the last read-back."""

    def __init__(self, epoch: int, epochs: int, iterations: int, images_per_iteration: int, first_step: int):
        from ray.experimental import tqdm_ray

        self.title = f"epoch {epoch}/{epochs}"
        self.iterations, self.images_per_iteration = iterations, images_per_iteration
        self.first_step, self.done = first_step, 0
        self.bar = tqdm_ray.tqdm(desc=self.title, total=iterations * images_per_iteration, unit="img")

    def on_read(self, row: dict[str, float]) -> None:
        done = row["step"] - self.first_step
        self.bar.set_description(f"{self.title} it {done}/{self.iterations} "
                                 f"loss_d {row['loss_d']:.3f} loss_g {row['loss_g']:.3f}")
        self.bar.update((done - self.done) * self.images_per_iteration)
        self.done = done

    def close(self) -> None:
        self.bar.close()


def checkpoint_callback():
    """A Ray Train callback that says on the console when Ray has registered a checkpoint.

    From that line on, a killed worker or driver resumes from that epoch, not earlier.
    """
    from ray.train import UserCallback

    class CheckpointSaved(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None:
                print(f"checkpoint of epoch {metrics[0]['epoch']} saved: a restart resumes from it", flush=True)

    return CheckpointSaved()


def trial_count(space: dict, num_samples: int, grid: bool) -> int:
    """Trials Tune will run: with ``grid``, each list in the space multiplies num_samples."""
    return num_samples * math.prod(len(spec) for spec in space.values() if grid and isinstance(spec, list))


def sweep_callback(total: int, metric: str, mode: str):
    """A Tune callback drawing trials done out of ``total`` and the best per-epoch ``metric`` so far."""
    from ray.tune import Callback
    from tqdm import tqdm

    class SweepBar(Callback):
        def __init__(self):
            self.bar = tqdm(total=total, unit="trial", desc="sweep", dynamic_ncols=True)
            self.best = math.nan

        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value) and (
                    math.isnan(self.best) or (value < self.best if mode == "min" else value > self.best)):
                self.best = value
                self.bar.set_postfix_str(f"best {metric} {value:.4g} ({trial.trial_id})")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.bar.update(1)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.bar.update(1)

        def on_experiment_end(self, trials, **info):
            self.bar.close()

    return SweepBar()


class Stopwatch:
    """Seconds per named stretch of the driver's work, one lap after another."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self._last = now - self._last, now
