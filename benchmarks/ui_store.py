"""A project run on real MNIST for the README's MLflow UI pictures: a train run and a small sweep.

Builds a scratch git + DVC repository whose mirror holds the first --train-images
real training digits and the full real test split, then runs the real
`dvc repro train@mnist` and `dvc repro sweep` (ASHA over lr_g, lr_d and d_steps).
Point the browser test at it to refresh docs/ui-*.png:

    python benchmarks/ui_store.py --data DATA_DIR/mnist --out /tmp/ganpipe-ui
    GANPIPE_UI_STORE=/tmp/ganpipe-ui GANPIPE_UPDATE_DOCS=1 python -m pytest tests/test_ui.py

The defaults (12k digits, DCGAN-32, 4 epochs, 4 trials of up to 2 epochs, 1 CPU
worker) take about 8 minutes on a 2-core CPU; the README's pictures used
--train-images 30000 --epochs 5 (12 minutes, the FID falling every epoch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scratch import project_params, run, scratch_repo, subset_mirror  # benchmarks/ is on sys.path


def store_params(mirror: Path, args) -> dict:
    params = project_params(mirror)
    params["model"].update(name="dcgan", channels=32)
    params["evaluator"].update(epochs=3)
    params["train"].update(epochs=args.epochs, batch_size=64, eval_samples=2000, log_every=20)
    params["ray"].update(num_workers=1, use_gpu=False)
    params["sweep"].update(
        dataset="mnist", num_samples=max(1, args.trials // 2), epochs=args.sweep_epochs, scheduler="asha",
        num_workers=1, max_concurrent_trials=1,
        # g_steps stays 1: the compare view then plots the three swept knobs.
        space={"lr_g": {"loguniform": [1.0e-4, 1.0e-3]}, "lr_d": {"loguniform": [1.0e-4, 1.0e-3]},
               "d_steps": [1, 2]})
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="a folder with the four real MNIST .gz files, e.g. DATA_DIR/mnist")
    parser.add_argument("--out", type=Path, required=True, help="the repository to create (must not exist)")
    parser.add_argument("--train-images", type=int, default=12_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--sweep-epochs", type=int, default=2)
    args = parser.parse_args()

    repo = args.out.resolve()
    mirror = repo.parent / f"{repo.name}-mirror"
    subset_mirror(args.data, mirror, args.train_images)
    scratch_repo(repo, store_params(mirror, args))
    for command in (["dvc", "repro", "train@mnist"], ["dvc", "repro", "sweep"]):
        run(command, repo)
    print(f"\nGANPIPE_UI_STORE={repo} GANPIPE_UPDATE_DOCS=1 python -m pytest tests/test_ui.py")


if __name__ == "__main__":
    main()
