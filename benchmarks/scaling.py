"""Weak scaling on CPU workers: `ganpipe train` with 1 and 2 Ray workers at the same per-worker batch.

    python benchmarks/scaling.py --data DATA_DIR/mnist --out OUT

Three runs on the same real-MNIST subset, equal epochs: one worker at batch B; two workers with
``train.batch_scaling: per_worker`` (B each, global 2B: more images per second where workers have their
own GPUs); two workers with ``split`` (B/2 each, global B: the default, the same updates at any worker
count). Prints img/s, steps and FID per run and writes OUT/scaling.json, which docs/tables.py renders.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import yaml

from scratch import project_params, run, scratch_repo, subset_mirror  # benchmarks/ is on sys.path

RUNS = (("1 worker", 1, "split"), ("2 workers, per_worker", 2, "per_worker"), ("2 workers, split", 2, "split"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder with the four real MNIST .gz files")
    parser.add_argument("--out", type=Path, required=True, help="scratch folder (must not exist)")
    parser.add_argument("--train-images", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker (on a machine with two or more)")
    args = parser.parse_args()

    out = args.out.resolve()
    mirror = out / "mirror"
    subset_mirror(args.data, mirror, args.train_images)
    params = project_params(mirror)
    params["model"].update(name="dcgan", channels=16, latent_dim=64, spectral_norm=False)
    params["evaluator"].update(epochs=2)
    params["mlflow"].update(register_model=False)
    repo = scratch_repo(out / "project", params)
    for stage in ("fetch", "preprocess", "evaluator"):  # once: every run trains on the same data and yardstick
        run(["ganpipe", stage, "--dataset", "mnist"], repo, quiet=True)
    rows = []
    for name, workers, scaling in RUNS:
        params["train"].update(epochs=args.epochs, batch_size=args.batch, batch_scaling=scaling, eval_samples=2000,
                               g_ema=0.0, log_every=50)
        params["ray"].update(num_workers=workers, use_gpu=args.use_gpu)
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        started = time.perf_counter()
        run(["ganpipe", "train", "--dataset", "mnist", "--fresh"], repo, quiet=True)
        wall = time.perf_counter() - started
        report = json.loads((repo / "metrics/train/mnist.json").read_text())
        global_batch = args.batch * workers if scaling == "per_worker" else args.batch
        rows.append({"run": name, "workers": workers, "batch_scaling": scaling, "global_batch": global_batch,
                     "steps": report["step"], "img_per_s": round(report["images_per_sec"]),
                     "train_s": report["timings"]["train_s"], "stage_s": round(wall, 1), "fid": round(report["fid"], 3)})
        print(rows[-1], flush=True)
    record = {"date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()}-core CPU", "rows": rows,
              "train_images": args.train_images, "epochs": args.epochs, "batch": args.batch}
    (out / "scaling.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{args.train_images} real MNIST images, DCGAN-16, {args.epochs} epochs, batch {args.batch} per worker "
          f"(split: global), {'GPU workers' if args.use_gpu else 'CPU workers of one thread each'}\n")
    print("| run | global batch | steps | img/s | train s | FID |\n| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['run']} | {row['global_batch']} | {row['steps']} | {row['img_per_s']:,} | {row['train_s']:.1f} "
              f"| {row['fid']:.3f} |")


if __name__ == "__main__":
    main()
