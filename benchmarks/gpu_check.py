"""Everything a GPU must confirm, in one call, with torch alone (no Ray, MLflow or DVC).

Writes one JSON file (sections are saved as they finish) and prints a summary:
  1. throughput of DCGAN-28 on real MNIST at batch 64 and 512: the tutorial loop,
     the engine eager (fp32), and the engine with the whole step as one CUDA graph
     (fp32 and bf16), against the targets (>= 50k and >= 150k img/s on one H100);
  2. graph vs eager: the losses of 200 iterations from the same seed, fp32 and bf16;
  3. params.yaml's default config through the engine on each real dataset, scored
     each epoch by the pipeline's evaluator (trained here on the same data): FID
     per epoch and seconds per epoch, graph and eager, next to the real-vs-real floor;
  4. peak GPU memory of each section.

    python benchmarks/gpu_check.py --data-root DIR [--datasets mnist fashion_mnist] [--epochs 3]
        [--long-epochs 20] --out OUT/gpu_check.json

DIR holds one folder per dataset with its four IDX .gz files (a ``data.mirrors`` folder).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(Path(__file__).resolve().parent)]

from gan.data import DeviceBatches  # noqa: E402
from gan.engine import GANTrainer  # noqa: E402
from gan.images import save_png  # noqa: E402
from gan.models import build_models  # noqa: E402
from realdata import load_split, train_and_score, yardstick  # noqa: E402
from throughput import LATENT_DIM, TARGETS, time_engine, time_tutorial, tutorial_step_config  # noqa: E402


class Report:
    """The JSON file, rewritten after every section so a cut-off run keeps what it measured."""

    def __init__(self, path: Path, device: torch.device):
        self.path, self.device, self.data = path, device, {}

    def section(self, name: str, value) -> None:
        self.data[name] = value
        self.path.write_text(json.dumps(self.data, indent=2, default=float) + "\n")

    def peak_memory(self) -> float | None:
        """GiB allocated at the peak since the last call (None off CUDA)."""
        if self.device.type != "cuda":
            return None
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.device)
        return round(peak, 3)


def throughput(images: np.ndarray, device: torch.device, steps: int, warmup: int) -> list[dict]:
    torch.manual_seed(0)
    models = build_models("dcgan", (1, 28, 28), latent_dim=LATENT_DIM)
    rows = []
    for batch_size in (64, 512):
        rows.append({"loop": "tutorial", "batch": batch_size,
                     "img_per_s": time_tutorial(models, images, batch_size, device, warmup, steps, workers=2)})
        for loop, graph, bf16 in (("eager fp32", False, False), ("graph fp32", True, False),
                                  ("graph bf16", True, True), ("eager bf16", False, True)):
            rate, trainer = time_engine(models, images, batch_size, device, warmup, steps, graph=graph, bf16=bf16)
            rows.append({"loop": loop, "batch": batch_size, "img_per_s": rate, "graph_ran": trainer.use_graph,
                         "graph_fallback_reason": trainer.graph_fallback_reason})
        fastest = max((r for r in rows if r["batch"] == batch_size), key=lambda r: r["img_per_s"])
        rows.append({"loop": f"fastest ({fastest['loop']})", "batch": batch_size, "img_per_s": fastest["img_per_s"],
                     "target": TARGETS[batch_size], "meets_target": fastest["img_per_s"] >= TARGETS[batch_size]})
    return rows


def graph_vs_eager(images: np.ndarray, device: torch.device, iterations: int) -> dict:
    """Two trainers from identical weights and seeds, one captured as a CUDA graph; per-iteration losses."""
    torch.manual_seed(0)
    models = build_models("dcgan", (1, 28, 28), latent_dim=LATENT_DIM)
    data = torch.from_numpy(images).to(device)
    out = {}
    for precision in ("fp32", "bf16"):
        curves, graph_ran = {}, None
        for graph in (False, True):
            config = tutorial_step_config(graph, bf16=precision == "bf16", log_every=1)
            trainer = GANTrainer(*copy.deepcopy(models), config, device=device, seed=0)
            batches = itertools.islice(DeviceBatches(data, 128, seed=0), iterations)
            history = trainer.train_epoch(batches).history
            curves[graph] = np.array([[row["loss_d"], row["loss_g"]] for row in history])
            if graph:
                graph_ran, reason = trainer.use_graph, trainer.graph_fallback_reason
        difference = np.abs(curves[True] - curves[False])
        out[precision] = {
            "graph_ran": graph_ran, "graph_fallback_reason": reason, "iterations": len(difference),
            # iterations 1-3 are eager warm-ups in both; 4 is the first (checked) replay
            "max_abs_diff_iterations_1_to_3": float(difference[:3].max()),
            "abs_diff_iteration_4": difference[3].tolist(),
            "max_abs_diff_iterations_4_to_20": float(difference[3:20].max()),
            "max_abs_diff_all": float(difference.max()),
            "mean_loss_d_g_last_50_eager": curves[False][-50:].mean(0).tolist(),
            "mean_loss_d_g_last_50_graph": curves[True][-50:].mean(0).tolist(),
        }
    return out


def quality(params: dict, folder: Path, device: torch.device, args, report: Report, name: str) -> dict:
    """params.yaml's default on a real dataset, graph and eager, scored every epoch by the evaluator."""
    stick = yardstick(folder, params["evaluator"], device, args.eval_samples)
    print(f"{name}: evaluator {stick.test_accuracy:.4f} test accuracy in {stick.seconds:.1f} s; "
          f"FID floor {stick.floor['fid']:.3f}", flush=True)
    out = {"evaluator": {"test_accuracy": stick.test_accuracy, "seconds": stick.seconds},
           "floor": stick.floor, "noise_ceiling_fid": stick.noise_fid}
    runs = {"graph": args.epochs, "eager": args.epochs, "graph_long": args.long_epochs}
    for run, epochs in runs.items():
        if not epochs:
            continue
        run_params = {**params, "train": {**params["train"], "cuda_graph": run != "eager"}}
        result = train_and_score(run_params, stick, device, epochs=epochs, score_at=list(range(1, epochs + 1)),
                                 eval_samples=args.eval_samples)
        for row in result["scores"]:
            print(f"  {run} epoch {row['epoch']}: {row['epoch_seconds']:.2f} s "
                  f"({row['epoch_img_per_s']:,.0f} img/s), FID {row['fid']:.2f}", flush=True)
        if run == "graph_long":
            save_png(result.pop("grid"), report.path.parent / f"samples_{name}.png")
        result.pop("grid", None)
        out[run] = result
    out["peak_memory_gib"] = report.peak_memory()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True, help="folder with <dataset>/ IDX mirrors")
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the default config, graph and eager")
    parser.add_argument("--long-epochs", type=int, default=0, help="then a longer graph run (0: none)")
    parser.add_argument("--eval-samples", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=500, help="timed steps per throughput figure")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--iterations", type=int, default=200, help="graph-vs-eager iterations")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only as a smoke test of the script")
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write, outside the repository")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here (--device cpu runs a smoke test)")
    torch.backends.cudnn.benchmark = True
    params = yaml.safe_load(args.params.read_text())
    report = Report(args.out, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    report.section("environment", {"gpu": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                                   "cudnn": torch.backends.cudnn.version(), "date": time.strftime("%Y-%m-%d")})
    print(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)

    mnist_train, _ = load_split(args.data_root / "mnist", "train")
    started = time.perf_counter()
    report.section("throughput", throughput(mnist_train, device, args.steps, args.warmup))
    report.section("throughput_peak_memory_gib", report.peak_memory())
    print(f"throughput done in {time.perf_counter() - started:.0f} s", flush=True)
    report.section("graph_vs_eager", graph_vs_eager(mnist_train, device, args.iterations))
    for name in args.datasets:
        report.section(f"default_{name}", quality(params, args.data_root / name, device, args, report, name))

    print_summary(report.data)


def print_summary(data: dict) -> None:
    print(f"\n{data['environment']['gpu']}: DCGAN-28 throughput on real MNIST")
    print("| loop | batch | img/s | s per 60k epoch | graph ran |")
    print("| --- | --- | --- | --- | --- |")
    for row in data["throughput"]:
        target = f" (target >= {row['target']:,})" if "target" in row else ""
        print(f"| {row['loop']}{target} | {row['batch']} | {row['img_per_s']:,.0f} | {60_000 / row['img_per_s']:.2f} "
              f"| {row.get('graph_ran', '')} |")
    for precision, check in data["graph_vs_eager"].items():
        print(f"graph vs eager {precision}: graph ran {check['graph_ran']}, |diff| iteration 4 "
              f"{check['abs_diff_iteration_4']}, max over 4-20 {check['max_abs_diff_iterations_4_to_20']:.2e}, "
              f"last-50 means eager {np.round(check['mean_loss_d_g_last_50_eager'], 3).tolist()} "
              f"graph {np.round(check['mean_loss_d_g_last_50_graph'], 3).tolist()}")
    for key, value in data.items():
        if not key.startswith("default_"):
            continue
        print(f"\n{key[8:]}: evaluator {value['evaluator']['test_accuracy']:.4f}, floor FID {value['floor']['fid']:.3f}")
        print("| run | epoch | s/epoch | img/s | FID | KID | IS | coverage | precision | recall |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for run in ("graph", "eager", "graph_long"):
            for row in value.get(run, {}).get("scores", []):
                print(f"| {run} | {row['epoch']} | {row['epoch_seconds']:.2f} | {row['epoch_img_per_s']:,.0f} "
                      f"| {row['fid']:.2f} "
                      f"| {row['kid']:.4f} | {row['inception_score']:.2f} | {row['class_coverage']:.1f} "
                      f"| {row['precision']:.2f} | {row['recall']:.2f} |")


if __name__ == "__main__":
    main()
