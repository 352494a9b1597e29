"""A real budget-limited sweep on MNIST: the pipeline's own `dvc repro sweep`, Optuna's TPE with ASHA.

Builds a scratch project whose mirror holds the first --train-images real digits
(and the full real test split), runs the evaluator and the sweep stage exactly as
a user would, and prints the ranked trials and the `benchmarks/recipes.py` command
that scores the sweep's best against the default and the presets at the same
budget (the same subset and epochs):

    python benchmarks/sweep_realdata.py --data DATA_DIR/mnist --out /tmp/ganpipe-sweep
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import yaml

from scratch import project_params, run, scratch_repo, subset_mirror  # benchmarks/ is on sys.path


def sweep_params(mirror: Path, args) -> dict:
    params = project_params(mirror)
    params["train"].update(eval_samples=args.eval_samples)
    params["ray"].update(use_gpu=False)
    params["sweep"].update(
        dataset="mnist", search="optuna", startup_trials=args.startup_trials, scheduler="asha",
        num_samples=args.trials, epochs=args.epochs, grace_period=1, reduction_factor=2, num_workers=1,
        max_concurrent_trials=args.concurrent, seed=0,
        space={"lr_g": {"loguniform": [5.0e-5, 2.0e-3]}, "lr_d": {"loguniform": [5.0e-5, 2.0e-3]},
               "d_steps": [1, 2]})
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder with the four real MNIST .gz files")
    parser.add_argument("--out", type=Path, required=True, help="the scratch repository to create (must not exist)")
    parser.add_argument("--train-images", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=2, help="budget per trial, in epochs of --train-images")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--startup-trials", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--eval-samples", type=int, default=2000)
    args = parser.parse_args()

    repo = args.out.resolve()
    mirror = repo.parent / f"{repo.name}-mirror"
    subset_mirror(args.data, mirror, args.train_images)
    scratch_repo(repo, sweep_params(mirror, args))
    run(["dvc", "repro", "evaluator@mnist"], repo)
    run(["dvc", "repro", "sweep"], repo)

    table = pd.read_csv(repo / "sweep/results.csv")
    print(table.drop(columns=["mlflow_run_id"]).to_string(index=False))
    best = yaml.safe_load((repo / "sweep/best_params.yaml").read_text())["train"]
    summary = json.loads((repo / "sweep/summary.json").read_text())
    print(f"\nbest FID {summary['best_fid']:.2f} at n = {args.eval_samples}; ASHA saved {summary['budget_saved']:.0%}")
    variant = ";".join(f"train.{key}={value}" for key, value in best.items())
    print("Score it against the default and the presets at the same budget:\n"
          f"  python benchmarks/recipes.py --data-root {args.data.parent} --datasets mnist --epochs {args.epochs} "
          f"--train-images {args.train_images} --variant 'sweep-best:{variant}'")


if __name__ == "__main__":
    main()
