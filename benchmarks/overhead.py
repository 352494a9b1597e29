"""The fixed cost around training: `ganpipe train` and a sweep against the engine alone doing the same work.

On a GPU an MNIST epoch takes seconds, so what a user waits for is what the
pipeline adds: starting Ray and a worker group, handing the data over, the MLflow
run, checkpoint reports, exporting and registering the model. This script
measures, in one run and at equal threads (one CPU worker, one torch thread):

1. the engine alone: the same model, data, epochs and per-epoch evaluation, in this process;
2. `ganpipe train` (a subprocess, as DVC runs it), its seconds split by the report's ``timings``;
3. a sweep of --trials one-epoch-budget trials against --trials times the engine alone.

    python benchmarks/overhead.py --data DATA_DIR/mnist --out OUT

writes its figures to OUT/overhead.json (OUT: the scratch repository), which docs/tables.py renders.

Targets: train costs at most 15% + 20 s over the engine alone; a sweep trial at most 5 s
beyond its training.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import pandas as pd
import torch

from scratch import project_params, run, scratch_repo, subset_mirror  # benchmarks/ is on sys.path


def bench_params(mirror: Path, args) -> dict:
    params = project_params(mirror)
    params["model"].update(name="dcgan", channels=16, latent_dim=64)
    params["evaluator"].update(epochs=2)
    params["train"].update(epochs=args.epochs, batch_size=64, eval_samples=args.eval_samples, log_every=50)
    params["ray"].update(num_workers=1, use_gpu=False)
    params["mlflow"].update(register_model=True)
    params["sweep"].update(dataset="mnist", space={"lr_d": [1e-4, 2e-4, 4e-4, 8e-4][:args.trials]}, num_samples=1,
                           scheduler="fifo", search="random", epochs=args.sweep_epochs, num_workers=1,
                           max_concurrent_trials=1)
    return params


def engine_alone(repo: Path, epochs: int) -> float:
    """Seconds for ``epochs`` epochs of the engine with rank 0's per-epoch evaluation, on one thread."""
    from gan.conditioning import conditioning_of
    from gan.data import DeviceBatches
    from gan.engine import EngineConfig, GANTrainer
    from gan.metrics import evaluate
    from pipeline.yardstick import load_reference
    from pipeline.config import load_config
    from pipeline.artifacts import load_processed
    from pipeline.modeling import build_generator_and_discriminator

    torch.set_num_threads(1)
    cfg = load_config(repo / "params.yaml")
    arrays = load_processed("mnist", repo)
    evaluator, reference = load_reference("mnist", repo, torch.device("cpu"), arrays)
    started = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    generator, discriminator = build_generator_and_discriminator(cfg.model, "mnist")
    labels = torch.from_numpy(arrays["y_train"]) if conditioning_of(generator).labelled else None  # as the loop
    batches = DeviceBatches(torch.from_numpy(arrays["x_train"]), cfg.train.batch_size, seed=cfg.train.seed,
                            labels=labels)
    trainer = GANTrainer(generator, discriminator, EngineConfig.from_mapping(cfg.train.model_dump()),
                         device=torch.device("cpu"), seed=cfg.train.seed + 1000)
    for _ in range(epochs):
        trainer.train_epoch(batches)
        evaluate(trainer.sample, evaluator, reference, n=cfg.train.eval_samples, device=torch.device("cpu"))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder with the four real MNIST .gz files")
    parser.add_argument("--out", type=Path, required=True, help="the scratch repository to create (must not exist)")
    parser.add_argument("--train-images", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--eval-samples", type=int, default=2000)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--sweep-epochs", type=int, default=1)
    args = parser.parse_args()

    repo = args.out.resolve()
    subset_mirror(args.data, repo.parent / f"{repo.name}-mirror", args.train_images)
    scratch_repo(repo, bench_params(repo.parent / f"{repo.name}-mirror", args))
    run(["dvc", "repro", "evaluator@mnist"], repo, quiet=True)  # the inputs, not measured

    engine = engine_alone(repo, args.epochs)
    engine_trial = engine_alone(repo, args.sweep_epochs)
    stage = run(["ganpipe", "train", "--dataset", "mnist"], repo, quiet=True)
    timings = json.loads((repo / "metrics/train/mnist.json").read_text()).get("timings", {})
    sweep = run(["ganpipe", "sweep"], repo, quiet=True)
    trials = pd.read_csv(repo / "sweep/results.csv")

    print(f"\n{args.train_images} real MNIST images, DCGAN-16, batch 64, {args.eval_samples} evaluation samples "
          f"per epoch, 1 CPU worker, torch on 1 thread\n")
    fixed = stage - engine
    target = 0.15 * engine + 20
    print(f"train, {args.epochs} epochs | seconds")
    print("--- | ---")
    print(f"engine alone (reference) | {engine:.1f}")
    print(f"`ganpipe train` | {stage:.1f}")
    print(f"fixed cost | {fixed:.1f} ({fixed / engine:.0%} of the engine; target <= {target:.1f} s: "
          f"{'met' if fixed <= target else 'not met'})")
    accounted = sum(timings.values()) - timings.get("fit_s", 0)
    parts = {"process start and imports": stage - accounted, **timings}
    for key, value in parts.items():
        if key != "fit_s":
            print(f"  {key.removesuffix('_s').replace('_', ' ')} | {value:.1f}")

    per_trial = trials["wall_seconds"] - engine_trial
    record = {"date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()}-core CPU, 1 worker, 1 thread",
              "train_images": args.train_images, "epochs": args.epochs, "eval_samples": args.eval_samples,
              "engine_s": round(engine, 1), "stage_s": round(stage, 1), "fixed_s": round(fixed, 1),
              "fixed_target_s": round(target, 1),
              "parts_s": {key.removesuffix("_s"): round(value, 1) for key, value in parts.items() if key != "fit_s"},
              "trials": len(trials), "sweep_epochs": args.sweep_epochs, "engine_trial_s": round(engine_trial, 1),
              "sweep_s": round(sweep, 1), "per_trial_extra_mean_s": round(per_trial.mean(), 1),
              "per_trial_extra_max_s": round(per_trial.max(), 1)}
    (repo / "overhead.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nsweep, {len(trials)} trials of {args.sweep_epochs} epoch(s) | seconds")
    print("--- | ---")
    print(f"{len(trials)} x engine alone (reference) | {len(trials) * engine_trial:.1f}")
    print(f"`ganpipe sweep` | {sweep:.1f}")
    print(f"stage fixed cost (sweep - {len(trials)} x engine) | {sweep - len(trials) * engine_trial:.1f}")
    print(f"per trial beyond its training (Tune's trial time - engine) | {per_trial.mean():.1f} mean, "
          f"{per_trial.max():.1f} max (target <= 5 s: {'met' if per_trial.max() <= 5 else 'not met'})")


if __name__ == "__main__":
    main()
