"""A project run on real MNIST for the README's MLflow UI pictures: a train run and a small sweep.

Builds a scratch git + DVC repository whose mirror holds the first --train-images
real training digits and the full real test split, then runs the real
`dvc repro train@mnist` and `dvc repro sweep` (ASHA over lr_g, lr_d and d_steps).
Point the browser test at it to refresh docs/ui-*.png:

    python benchmarks/ui_store.py --data ../shared/data/mnist --out /tmp/ganpipe-ui
    GANPIPE_UI_STORE=/tmp/ganpipe-ui GANPIPE_UPDATE_DOCS=1 python -m pytest tests/test_ui.py

The defaults (12k digits, DCGAN-32, 4 epochs, 4 trials of up to 2 epochs, 1 CPU
worker) take about 8 minutes on a 2-core CPU; the README's pictures used
--train-images 30000 --epochs 5 (12 minutes, the FID falling every epoch).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gan.data import load_idx_split  # noqa: E402
from real_mnist import idx_gz  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def subset_mirror(data: Path, mirror: Path, train_images: int) -> None:
    """The real IDX files, the train split cut to its first ``train_images`` digits."""
    mirror.mkdir(parents=True)
    for split, (images_name, labels_name) in FILES.items():
        images, labels = load_idx_split(data / images_name, data / labels_name)
        if split == "train":
            images, labels = images[:train_images], labels[:train_images]
        (mirror / images_name).write_bytes(idx_gz(images))
        (mirror / labels_name).write_bytes(idx_gz(labels))


def store_params(mirror: Path, args) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(datasets=["mnist"], mirrors={"mnist": [str(mirror)]}, verify_checksums=False)
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


def run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the repository's own SQLite store
    started = time.perf_counter()
    subprocess.run(args, cwd=cwd, env=env, check=True)
    print(f"{' '.join(args)}: {time.perf_counter() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mnist",
                        help="a folder with the four real MNIST .gz files")
    parser.add_argument("--out", type=Path, required=True, help="the repository to create (must not exist)")
    parser.add_argument("--train-images", type=int, default=12_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--sweep-epochs", type=int, default=2)
    args = parser.parse_args()

    repo = args.out.resolve()
    subset_mirror(args.data, repo.parent / f"{repo.name}-mirror", args.train_images)
    repo.mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", repo)
    for package in ("gan", "pipeline"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(yaml.safe_dump(store_params(repo.parent / f"{repo.name}-mirror", args),
                                                     sort_keys=False))
    (repo / ".gitignore").write_text("mlruns/\nray_results/\n")
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=ganpipe", "-c", "user.email=ganpipe@localhost", "commit", "-qm", "store"],
                    ["dvc", "repro", "train@mnist"], ["dvc", "repro", "sweep"]):
        run(command, repo)
    print(f"\nGANPIPE_UI_STORE={repo} GANPIPE_UPDATE_DOCS=1 python -m pytest tests/test_ui.py")


if __name__ == "__main__":
    main()
