"""The whole pipeline on real digits, and Ray Train's overhead over the bare engine.

Splits the 10k real MNIST test images (`t10k-*-ubyte.gz`, the MNIST site's files)
8k/2k into an IDX mirror, runs the real `dvc repro train@mnist` in a scratch
git + DVC repository, and prints the FID per epoch next to the evaluator's
real-vs-real floor. Then it trains the same model on the same data for the same
epochs by calling the engine directly and prints the wall-time ratio.

With --sweep-trials N it then runs `dvc repro sweep` (ASHA, N trials, the same
epoch budget) on the same data and prints the best config next to the default.

    python benchmarks/real_mnist.py --data DATA_DIR/mnist [--epochs 5] [--workers 1] [--sweep-trials 6]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gan.conditioning import conditioning_of  # noqa: E402
from gan.data import DeviceBatches, load_idx_split  # noqa: E402
from gan.engine import EngineConfig, GANTrainer  # noqa: E402
from gan.metrics import evaluate  # noqa: E402
from pipeline.config import validate  # noqa: E402
from pipeline.yardstick import load_reference  # noqa: E402
from pipeline.modeling import build_generator_and_discriminator  # noqa: E402


def idx_gz(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def write_split_mirror(data: Path, mirror: Path, n_train: int, seed: int = 0) -> None:
    images, labels = load_idx_split(data / "t10k-images-idx3-ubyte.gz", data / "t10k-labels-idx1-ubyte.gz")
    order = np.random.default_rng(seed).permutation(len(images))
    train, test = order[:n_train], order[n_train:]
    mirror.mkdir(parents=True)
    for name, array in {"train-images-idx3-ubyte.gz": images[train], "train-labels-idx1-ubyte.gz": labels[train],
                        "t10k-images-idx3-ubyte.gz": images[test], "t10k-labels-idx1-ubyte.gz": labels[test]}.items():
        (mirror / name).write_bytes(idx_gz(array))


def run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(args, cwd=cwd, env=env, check=True)


def pipeline_run(repo: Path, params: dict) -> float:
    repo.mkdir()
    shutil.copy(REPO / "dvc.yaml", repo)
    for package in ("gan", "pipeline", "presets"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "repro", "evaluator@mnist"], repo)
    started = time.perf_counter()
    run(["dvc", "repro", "train@mnist"], repo)
    return time.perf_counter() - started


def direct_run(repo: Path, params: dict) -> float:
    """The same epochs through the engine alone: one process, no Ray, no MLflow."""
    cfg = validate(params)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.train.seed)
    generator, discriminator = build_generator_and_discriminator(cfg.model, "mnist")
    with np.load(repo / "data/processed/mnist.npz") as npz:
        x_train = torch.from_numpy(npz["x_train"]).to(device)
        # a conditional model trains on (image, label) batches, as the loop gives them
        labels = torch.from_numpy(npz["y_train"]).to(device) if conditioning_of(generator).labelled else None
    evaluator, reference = load_reference("mnist", repo, device)
    started = time.perf_counter()
    trainer = GANTrainer(generator, discriminator, EngineConfig.from_mapping(cfg.train.model_dump()),
                         device=device, seed=cfg.train.seed)
    batches = DeviceBatches(x_train, cfg.train.batch_size, seed=cfg.train.seed, labels=labels)
    for _ in range(cfg.train.epochs):
        trainer.train_epoch(batches)
        evaluate(trainer.sample, evaluator, reference, n=cfg.train.eval_samples, device=device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="a folder with MNIST's t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz, e.g. DATA_DIR/mnist")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sweep-trials", type=int, default=0, help="also sweep lr_g, lr_d, d_steps with ASHA")
    parser.add_argument("--keep", type=Path, help="keep the scratch repository here")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="ganpipe-real-"))
    write_split_mirror(args.data, scratch / "mirror", n_train=8000)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(datasets=["mnist"], mirrors={"mnist": [str(scratch / "mirror")]}, verify_checksums=False)
    params["model"].update(channels=args.channels)
    params["evaluator"].update(epochs=10, batch_size=128)
    params["train"].update(epochs=args.epochs, batch_size=args.batch_size, eval_samples=2000, checkpoint_every=args.epochs)
    params["ray"].update(num_workers=args.workers)
    params["sweep"].update(dataset="mnist", num_samples=max(1, args.sweep_trials // 2), epochs=args.epochs,
                           num_workers=1, max_concurrent_trials=2)
    repo = scratch / "repo"

    ray_seconds = pipeline_run(repo, params)
    direct_seconds = direct_run(repo, params)

    floor = json.loads((repo / "metrics/evaluator/mnist.json").read_text())
    quality = pd.read_csv(repo / "plots/quality/mnist.csv")
    quality["fid floor (real vs real)"] = floor["real_vs_real"]["fid"]
    quality["fid noise ceiling"] = floor["noise"]["fid"]
    columns = ["epoch", "fid", "fid floor (real vs real)", "fid noise ceiling", "kid", "inception_score",
               "class_coverage", "class_kl", "precision", "recall", "images_per_sec"]
    print(f"\nevaluator test accuracy (2k held out): {floor['test_accuracy']:.4f}")
    print(quality[columns].to_markdown(index=False, floatfmt=".4g"))
    print(f"\ntrain@mnist under dvc repro (Ray Train, {args.workers} worker(s), MLflow): {ray_seconds:.1f} s")
    print(f"engine called directly, same epochs and evaluations:                  {direct_seconds:.1f} s")
    print(f"Ray Train + tracking overhead ratio: {ray_seconds / direct_seconds:.2f}x")
    print(f"sample grid: {repo / 'plots/samples/mnist.png'}")

    if args.sweep_trials:
        run(["dvc", "repro", "sweep"], repo)
        table = pd.read_csv(repo / "sweep/results.csv")
        summary = json.loads((repo / "sweep/summary.json").read_text())
        train = params["train"]
        print(f"\nsweep: {summary['trials']} trials, {summary['stopped_early']} stopped early by ASHA, "
              f"{summary['diverged']} diverged; ASHA saved {summary['budget_saved']:.0%} of the epoch budget")
        print(table.drop(columns=["mlflow_run_id"]).to_markdown(index=False, floatfmt=".4g"))
        best = table.iloc[0]
        print(f"\nbest config  lr_g={best['lr_g']:.3g} lr_d={best['lr_d']:.3g} D:G={best['d_steps']}:1  "
              f"fid {best['fid']:.3f} after {best['epochs_run']} epochs")
        print(f"default      lr_g={train['lr_g']:.3g} lr_d={train['lr_d']:.3g} D:G={train['d_steps']}:{train['g_steps']}  "
              f"fid {quality['fid'].iloc[-1]:.3f} after {args.epochs} epochs")
    if args.keep:
        shutil.copytree(repo, args.keep, dirs_exist_ok=True)


if __name__ == "__main__":
    main()
