"""Calibrate the quality yardstick on the 10k real MNIST test images.

Splits them 8k/2k (seeded), trains an evaluator on the 8k, reports its accuracy
on the 2k, then scores three stand-in generators against the 2k with
``gan.metrics.reference_scores``: replayed real train images (the floor), uniform
noise and single-class replay (ceilings). Prints a markdown table and writes every figure to --out (JSON),
which docs/tables.py renders into docs/quality.md.

    python benchmarks/quality_floor.py --data DATA_DIR/mnist --out OUT/quality_floor.json [--n 2000] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from gan.data import idx_file_name, load_idx_split
from gan.evaluator_net import train_evaluator
from gan.metrics import reference_scores

LABELS = {"real_vs_real": "real train vs test (floor)", "noise": "uniform noise (ceiling)",
          "single_class": "class 0 only (ceiling)"}


def markdown_table(scores: dict[str, dict[str, float]]) -> str:
    lines = ["| stand-in generator | FID | KID | IS | classes hit | class KL | precision | recall | density | coverage "
             "| recall within a class |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in scores.items():
        within = f"{s['recall_within_class']:.3f}" if "recall_within_class" in s else "-"
        lines.append(
            f"| {LABELS[name]} | {s['fid']:.2f} | {s['kid']:.4f} ± {s['kid_std']:.4f} "
            f"| {s['inception_score']:.2f} ± {s['inception_score_std']:.2f} | {s['class_coverage']:.2f} "
            f"| {s['class_kl']:.3f} | {s['precision']:.3f} | {s['recall']:.3f} | {s['density']:.3f} "
            f"| {s['coverage']:.3f} | {within} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="folder with t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz, e.g. DATA_DIR/mnist")
    parser.add_argument("--train-size", type=int, default=8000)
    parser.add_argument("--n", type=int, default=2000, help="samples per stand-in generator")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (1 is fastest on a busy machine)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    images, labels = load_idx_split(args.data / idx_file_name("test_images"),
                                    args.data / idx_file_name("test_labels"))
    order = np.random.default_rng(args.seed).permutation(len(images))
    train, test = order[:args.train_size], order[args.train_size:]

    print(f"evaluator: {len(train)} train / {len(test)} held-out images, {args.epochs} epochs, "
          f"batch {args.batch_size}, device {args.device} ({torch.get_num_threads()} CPU threads)")
    net, stats = train_evaluator(
        images[train], labels[train], images[test], labels[test], epochs=args.epochs,
        batch_size=args.batch_size, seed=args.seed, device=args.device,
        progress=lambda epoch, s: print(f"  epoch {epoch}: loss {s['loss']:.4f}, "
                                        f"held-out accuracy {s['test_accuracy']:.2%}", flush=True))
    print(f"trained in {stats['train_seconds']:.1f}s: held-out accuracy {stats['test_accuracy']:.2%}, "
          f"train accuracy {stats['train_accuracy']:.2%}\n")

    start = time.perf_counter()
    scores = reference_scores(net, images[train], images[test], labels[test], n=args.n, device=args.device,
                              real_train_labels=labels[train], seed=args.seed)
    print(markdown_table(scores))
    seconds = time.perf_counter() - start
    print(f"\nreference_scores (3 x evaluate, n={args.n}): {seconds:.1f}s")
    record = {"date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()}-core CPU, "
              f"{torch.get_num_threads()} thread(s), {args.device}", "n": args.n, "train_size": len(train),
              "held_out": len(test), "evaluator_accuracy": stats["test_accuracy"],
              "evaluator_seconds": round(stats["train_seconds"], 1), "scores_seconds": round(seconds, 1),
              "scores": {name: {key: float(value) for key, value in s.items()} for name, s in scores.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
