"""The tutorial recipes (presets/) against the project's default, at one budget, on the full real datasets.

Every preset and params.yaml's default (plus any --variant) trains for the same
number of epochs, so the same number of real images seen, through the engine,
and is scored by the pipeline's evaluator (trained here on the same data) at
n samples. Prints one markdown table per dataset and writes, under --out-dir,
<name>.json (every figure) and <name>-<dataset>.png (each row's samples side by side;
--name, default recipes), both rewritten after every row.

    python benchmarks/recipes.py --data-root DIR [--datasets mnist fashion_mnist] [--epochs 10]
        [--score-at 2 5] [--eval-samples 10000] [--variant 'name:train.g_ema=0.999;model.spectral_norm=true']

Conditional rows (the default is acgan; ``CONDITIONAL_ROWS`` change only model.conditional) add
"cond acc" (the share of samples drawn for class k that the evaluator calls k) to the table; the
unconditional ones show "-". ``--set model.conditional=none`` reruns the tables measured before the
default was conditional: it changes params.yaml for the run, and presets still replace the keys they set.

DIR holds one folder per dataset with its four IDX .gz files (a ``data.mirrors`` folder).
Torch only: it runs on a GPU machine without Ray, MLflow or DVC.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(Path(__file__).resolve().parent)]

from pipeline.presets import apply_overrides, available, merge, preset_overrides  # noqa: E402
from realdata import train_and_score, yardstick  # noqa: E402


def parse_settings(items: list[str]) -> dict:
    """["train.g_ema=0.999", ...] -> {"train.g_ema": 0.999, ...}: each value read as YAML."""
    overrides = {}
    for item in filter(None, items):
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:train.g_ema=0.999;model.spectral_norm=true' -> ("name", {"train.g_ema": 0.999, ...})."""
    name, _, settings = text.partition(":")
    return name, parse_settings(settings.split(";"))


# Rows that change only model.conditional: (the row they start from, model.conditional). The default is
# acgan; default+none is the same GAN unconditional, the default before acgan beat it.
CONDITIONAL_ROWS = {"default+none": ("default", "none"), "default+concat": ("default", "concat"),
                    "default+projection": ("default", "projection"), "default+tacgan": ("default", "tacgan"),
                    "pytorch-examples+concat": ("pytorch-examples", "concat")}


def rows(params: dict, variants: list[str]) -> dict[str, dict]:
    """Row name -> the full params it trains: each preset, the default, the conditional rows, then the variants."""
    out = {name: merge(params, preset_overrides(name, REPO_ROOT)) for name in available(REPO_ROOT)}
    out["default"] = params
    for name, (base, conditional) in CONDITIONAL_ROWS.items():
        out[name] = apply_overrides(out[base], {"model.conditional": conditional})
    for text in variants:
        name, overrides = parse_variant(text)
        out[name] = apply_overrides(params, overrides)
    return out


def figure(results: dict[str, dict], dataset: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(results))
    lines = math.ceil(len(results) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 3.9 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, result) in zip(axes.flat, results.items()):
        ax.imshow(result["grid"], cmap="gray" if result["grid"].ndim == 2 else None)
        ax.set_title(f"{name}\nFID {result['scores'][-1]['fid']:.1f}", fontsize=10)
    fig.suptitle(f"{dataset}: samples after the same budget", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict[str, dict], stick, epochs: int) -> str:
    first = results[next(iter(results))]["scores"]
    early = first[0]["epoch"] if len(first) > 1 else None
    header = ["row"] + ([f"FID @{early} ep"] if early else []) + [
        "FID", "KID", "IS", "coverage", "class KL", "precision", "recall", "recall in class", "cond acc",
        "floor FID", "wall s", "img/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, result in sorted(results.items(), key=lambda item: item[1]["scores"][-1]["fid"]):
        last = result["scores"][-1]
        cells = [name] + ([f"{result['scores'][0]['fid']:.2f}"] if early else []) + [
            f"{last['fid']:.2f}", f"{last['kid']:.3f}", f"{last['inception_score']:.2f}",
            f"{last['class_coverage']:.1f}", f"{last['class_kl']:.3f}", f"{last['precision']:.2f}",
            f"{last['recall']:.2f}", f"{last['recall_within_class']:.2f}" if "recall_within_class" in last else "-",
            f"{last['cond_accuracy']:.3f}" if "cond_accuracy" in last else "-",
            f"{stick.floor['fid']:.3f}", f"{result['train_seconds']:.1f}",
            f"{result['img_per_s']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True, help="folder with <dataset>/ IDX mirrors")
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    parser.add_argument("--epochs", type=int, default=10, help="budget: epochs of 60k real images per row")
    parser.add_argument("--score-at", type=int, nargs="*", default=[2], help="also score after these epochs")
    parser.add_argument("--eval-samples", type=int, default=10_000)
    parser.add_argument("--train-images", type=int, help="train on the first N real images only (default: all)")
    parser.add_argument("--variant", action="append", default=[], help="name:dotted.key=value;... over the default")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change params.yaml for this run (presets still replace the keys they set)")
    parser.add_argument("--only", nargs="*", help="train only these rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for <name>.json and the grids")
    parser.add_argument("--name", default="recipes", help="output files: <name>.json and <name>-<dataset>.png")
    return parser


def plan_of(args: argparse.Namespace) -> tuple[dict, dict[str, dict]]:
    """params.yaml with --set applied, and the rows to train: every row, or --only's in its order."""
    params = apply_overrides(yaml.safe_load(args.params.read_text()), parse_settings(args.set))
    plan = rows(params, args.variant)
    unknown = sorted(set(args.only or []) - set(plan))
    if unknown:
        raise SystemExit(f"--only {' '.join(unknown)}: no such row (rows: {', '.join(plan)})")
    return params, {name: plan[name] for name in args.only} if args.only else plan


def main() -> None:
    args = build_parser().parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    params, plan = plan_of(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report_path = args.out_dir / f"{args.name}.json"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    report = {"device": device_name, "torch": torch.__version__, "epochs": args.epochs,
              "train_images": args.train_images,
              "eval_samples": args.eval_samples, "date": time.strftime("%Y-%m-%d"), "datasets": {}}
    tables = []
    for dataset in args.datasets:
        stick = yardstick(args.data_root / dataset, params["evaluator"], device, args.eval_samples)
        # The evaluator and the floor still use the full split.
        stick.x_train, stick.y_train = stick.x_train[:args.train_images], stick.y_train[:args.train_images]
        print(f"{dataset}: evaluator {stick.test_accuracy:.4f}, floor FID {stick.floor['fid']:.3f}", flush=True)
        results = {}
        for name, row_params in plan.items():
            results[name] = train_and_score(row_params, stick, device, epochs=args.epochs, score_at=args.score_at,
                                            eval_samples=args.eval_samples)
            last = results[name]["scores"][-1]
            conditional = f", cond acc {last['cond_accuracy']:.4f}" if "cond_accuracy" in last else ""
            print(f"  {name}: FID {last['fid']:.2f}{conditional} in {results[name]['train_seconds']:.1f} s "
                  f"({json.dumps({k: v for k, v in last.items()})})", flush=True)
            # Written after every row: a long CPU run keeps what it measured if it is stopped.
            figure(results, dataset, args.out_dir / f"{args.name}-{dataset}.png")
            report["datasets"][dataset] = {
                "evaluator_test_accuracy": stick.test_accuracy, "evaluator_seconds": stick.seconds,
                "floor": stick.floor, "noise_fid": stick.noise_fid,
                "rows": {name: {k: v for k, v in result.items() if k != "grid"} for name, result in results.items()},
                "settings": {name: {"model": p["model"], "train": p["train"]} for name, p in plan.items()
                             if name in results},
            }
            report_path.write_text(json.dumps(report, indent=2, default=float) + "\n")
        tables.append(f"\n{dataset} on {device_name}: {args.epochs} epochs of {len(stick.x_train):,} real images per row, "
                      f"n = {args.eval_samples}; evaluator accuracy {stick.test_accuracy:.4f}\n\n"
                      + table(results, stick, args.epochs))
    print("\n".join(tables))


if __name__ == "__main__":
    main()
