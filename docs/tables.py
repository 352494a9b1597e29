"""The figures tables of the docs, rendered from the committed JSON (or CSV) that measured them.

A page holds a table between two markers:

    <!-- table: conditional-default -->
    | ... rendered rows ... |
    <!-- /table -->

``python docs/tables.py`` rewrites every such block from its JSON; ``python docs/tables.py --check`` exits 1
naming each block that differs (tests/test_docs.py runs the check). A figure in a table is only ever the
JSON's: to change one, measure again and commit the JSON the benchmark wrote. Each block says which
command measured it, on which machine and when.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
BLOCK = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)
MACHINE_2CORE = "2-core CPU, 1 thread"
DATASETS = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
RECIPES_H100 = ("python benchmarks/recipes.py --data-root DIR --datasets {} --epochs 10 --score-at 2 5 "
                "--set model.conditional=none --variant 'default+smooth:train.label_smoothing=0.1' "
                "--variant 'default+hinge:train.loss=hinge' --variant 'default+b64:train.batch_size=64' --out-dir OUT")
RECIPES_CPU = ("python benchmarks/recipes.py --data-root DIR --datasets mnist --epochs 2 --train-images 10000 "
               "--score-at 1 --set model.conditional=none "
               "--variant 'sweep-best:train.lr_g=0.00048;train.lr_d=0.00172;train.d_steps=1' --out-dir OUT")
SWEEP_MNIST = "python benchmarks/sweep_realdata.py --data DIR/mnist --out OUT"


def load(path: str) -> dict:
    return json.loads((DOCS / path).read_text())


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, one line per row."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join(f"| {' | '.join(map(str, line))} |" for line in lines) + "\n"


def made_by(command: str, machine: str, date: str, path: str) -> str:
    """The line above a table: the command that measured it, on which machine, when, and its file."""
    return f"Command: `{command}`. Machine: {machine}. Date: {date}. Data: [{path}]({path}).\n\n"


def bold(text: str, on: bool) -> str:
    return f"**{text}**" if on else text


def last_scores(path: str, dataset: str, row: str) -> tuple[dict, dict]:
    """The row's scores at its last scored epoch, and the JSON's top level."""
    data = load(path)
    return data["datasets"][dataset]["rows"][row]["scores"][-1], data


def conditional_default() -> str:
    """The default (acgan, label_embedding 16) against the same GAN unconditional, at two CPU budgets."""
    # (JSON, dataset, the row's name in the JSON, its name today, budget, the recipes.py command)
    runs = []
    for ds, short in DATASETS.items():
        small = f"conditional-acgan-{ds}-10k-cpu.json"
        full = f"conditional-acgan-{ds}-60k-2ep-cpu.json"
        runs += [
            (small, ds, short, "default+acgan+embedding16", "default", "10k images, 2 epochs",
             f"--datasets {ds} --epochs 2 --train-images 10000 --eval-samples 10000 --only default"),
            (small if ds == "mnist" else "conditional-fashion_mnist-10k-cpu.json", ds, short, "default",
             "default+none", "10k images, 2 epochs",
             f"--datasets {ds} --epochs 2 --train-images 10000 --eval-samples 10000 --only default+none"),
            (full, ds, short, "default+acgan+embedding16", "default", "60k images, 2 epochs",
             f"--datasets {ds} --epochs 2 --eval-samples 10000 --only default"),
            (full, ds, short, "default", "default+none", "60k images, 2 epochs",
             f"--datasets {ds} --epochs 2 --eval-samples 10000 --only default+none"),
        ]
    header = ["dataset", "budget", "row", "FID", "precision", "recall", "cond acc",
              "command (`benchmarks/recipes.py --data-root DIR --device cpu --out-dir OUT ...`)", "machine", "date",
              "JSON"]
    rows = []
    for path, ds, short, row, shown, budget, command in runs:
        s, data = last_scores(path, ds, row)
        acc = f"{s['cond_accuracy']:.3f}" if "cond_accuracy" in s else "-"
        rows.append([short, budget, shown, f"{s['fid']:.2f}", f"{s['precision']:.2f}", f"{s['recall']:.2f}", acc,
                     f"`{command}`", MACHINE_2CORE, data["date"], f"[JSON]({path})"])
    return table(header, rows)


def recipes(path: str, dataset: str, command: str, shown_bold: str, machine: str | None = None) -> str:
    """Every row of a benchmarks/recipes.py run on one dataset, best final FID first; machine: the JSON's device."""
    data = load(path)
    ds = data["datasets"][dataset]
    ranked = sorted(ds["rows"].items(), key=lambda item: item[1]["scores"][-1]["fid"])
    header = ["row", f"FID @ {ranked[0][1]['scores'][0]['epoch']} ep", "FID", "KID", "IS", "coverage", "class KL",
              "precision", "recall", "wall s", "img/s"]
    rows = []
    for name, row in ranked:
        s, on = row["scores"][-1], name == shown_bold
        rows.append([bold(name, on), f"{row['scores'][0]['fid']:.2f}", bold(f"{s['fid']:.2f}", on), f"{s['kid']:.3f}",
                     f"{s['inception_score']:.2f}", f"{s['class_coverage']:.1f}", f"{s['class_kl']:.3f}",
                     f"{s['precision']:.2f}", f"{s['recall']:.2f}", f"{row['train_seconds']:.1f}",
                     f"{row['img_per_s']:,.0f}"])
    yardstick = (f"{DATASETS[dataset]}: evaluator {ds['evaluator_test_accuracy']:.2%}, "
                 f"floor {ds['floor']['fid']:.3f}, n = {data['eval_samples']:,}.\n\n")
    return made_by(command, f"{machine or data['device']}, torch {data['torch']}", data["date"], path) + yardstick + table(header, rows)


def recipes_h100(dataset: str) -> str:
    return recipes("recipes-h100.json", dataset, RECIPES_H100.format(dataset), "default")


def recipes_cpu() -> str:
    return recipes("recipes-mnist-10k-cpu.json", "mnist", RECIPES_CPU, "sweep-best", "2-core CPU")


def lr(value: float) -> str:
    """A learning rate as 1.72e-3 from 1e-3 up, as 4.8e-4 below."""
    return re.sub(r"e-0", "e-", f"{value:.2e}" if value >= 1e-3 else f"{value:.1e}")


def sweep_mnist() -> str:
    """The trials of the real Optuna sweep, best FID first, from the sweep/results.csv it wrote."""
    path = "sweep-mnist-10k-cpu.csv"
    with open(DOCS / path, newline="") as file:
        trials = sorted(csv.DictReader(file), key=lambda trial: float(trial["fid"]))
    rows = [[t["trial_id"], "TPE" if t["searched_by"] == "tpe" else t["searched_by"], lr(float(t["lr_g"])),
             lr(float(t["lr_d"])), f"{t['d_steps']}:1", bold(f"{float(t['fid']):.2f}", t is trials[0]),
             t["epochs_run"] + (" (stopped)" if t["status"] == "stopped_early" else "")] for t in trials]
    # the CSV holds no date: the day it was committed, with the recipes run that followed it
    return (made_by(SWEEP_MNIST, "2-core CPU, 2 trials at a time, one CPU worker each",
                    "2026-12-03 (committed; the CSV records no date)", path)
            + table(["trial", "picked by", "lr_g", "lr_d", "D:G", "FID (n = 2,000)", "epochs"], rows))


def gpu_engine() -> str:
    """The engine alone on one GPU: img/s of DCGAN-28 on the 60k MNIST images, 1 D + 1 G update per batch."""
    data = load("gpu-check-h100.json")
    env = data["environment"]
    machine = f"{env['gpu']}, torch {env['torch']}"
    command = "`benchmarks/gpu_check.py --data-root DIR --epochs 3 --out OUT/gpu_check.json`"
    rows = [[item["loop"], item["batch"], f"{item['img_per_s']:,.0f}", f"{60_000 / item['img_per_s']:.2f}", command,
             machine, env["date"]]
            for item in data["throughput"] if not item["loop"].startswith("fastest")]  # "fastest": a copy of a row
    return table(["loop", "batch", "img/s", "s per 60k epoch", "command", "machine", "date"], rows)


MAKE_DEMO = "make-demo-cpu.json"  # benchmarks/make_demo.py's record of a fresh clone's `make demo`


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60):02d} s"


def make_demo_stages() -> str:
    """`make demo` stage by stage, setup included, and what each reached."""
    data = load(MAKE_DEMO)
    got = data["reached"]
    what = {"setup": "venv, torch, the project (`make setup`)",
            "evaluator@mnist": f"test accuracy {got['evaluator_accuracy']:.2%}",
            "train@mnist": f"FID {got['train_fid']:.2f} at the end, conditional accuracy {got['train_cond_accuracy']:.3f}",
            "sweep": f"best FID {got['sweep_best_fid']:.2f}"}
    rows = [[f"`{item['stage']}`", f"{item['seconds']:.0f}", what.get(item["stage"], "")] for item in data["stages"]]
    rows.append(["**make demo**", f"**{data['seconds']:.0f}**", minutes(data["seconds"])])
    return made_by("python benchmarks/make_demo.py --data-root DATA_DIR --out OUT", data["machine"], data["date"],
                   MAKE_DEMO) + table(["stage", "seconds", "what it did"], rows)


def cpu_scaling() -> str:
    """1 and 2 CPU workers at the same per-worker batch (benchmarks/scaling.py)."""
    data = load("scaling-cpu.json")
    rows = [[row["run"], row["global_batch"], row["steps"], f"{row['img_per_s']:,}", f"{row['train_s']:.1f}",
             f"{row['fid']:.1f}"] for row in data["rows"]]
    return made_by("python benchmarks/scaling.py --data DATA_DIR/mnist --out OUT", data["machine"], data["date"],
                   "scaling-cpu.json") + table(["run", "global batch", "steps", "img/s", "train s", "FID"], rows)


def spool_outage() -> str:
    """What an outage of the tracking server costs rank 0's calls (benchmarks/spool_outage.py)."""
    data = load("spool-outage-cpu.json")
    rows = [["one epoch's calls, server up (median)", f"{data['epoch_calls_s_server_up']:.3f}"],
            ["the first epoch's calls once the server is dead (connection refused, one short retry, then spooled)",
             f"{data['first_epoch_calls_s_server_down']:.3f}"],
            ["each later epoch's calls while it is dead (append to the spool only, median)",
             f"{data['later_epoch_calls_s_server_down']:.4f}"],
            [f"delivering the {data['records_spooled']} spooled records after the restart (every epoch's point "
             f"present once: {'yes' if data['fid_steps_complete'] else 'no'})", f"{data['delivery_s_after_restart']:.2f}"]]
    return made_by(f"python benchmarks/spool_outage.py --out OUT --epochs {data['epochs']}", data["machine"],
                   data["date"], "spool-outage-cpu.json") + table(["", "seconds"], rows)


SUITE = "suite-cpu.json"  # benchmarks/suite_time.py's record of `make test`


def suite_time() -> str:
    data = load(SUITE)
    counts = f"{data['passed']} passed, {data['failed']} failed, {data['skipped']} skipped"
    return made_by("python benchmarks/suite_time.py --out OUT/suite.json", data["machine"], data["date"], SUITE) + \
        table(["run", "time", "tests"], [[f"`{data['command']}`", minutes(data["seconds"]), counts]])


def readme_commands() -> str:
    """What the three make commands cost, each from the JSON that measured it."""
    demo, suite = load(MAKE_DEMO), load(SUITE)
    rows = [["`make demo`", f"{minutes(demo['seconds'])}, setup included ([{demo['date']}, stage by stage]"
             f"(docs/benchmarks.md#make-demo))", "not measured"],
            ["`make repro`", "about 2 h of training per dataset, then the sweep: a GPU job ([how it was estimated]"
             "(docs/benchmarks.md#how-long-dvc-repro-takes))", "not measured"],
            ["`make test`", f"{minutes(suite['seconds'])} ([{suite['date']}](docs/testing.md))", "not measured"]]
    return table(["command", f"on a {demo['machine']}", "on one GPU"], rows)


def overhead() -> str:
    """What `ganpipe train` and a sweep add around the engine doing the same work (benchmarks/overhead.py)."""
    data = load("overhead-cpu.json")
    verdict = "met" if data["fixed_s"] <= data["fixed_target_s"] else "not met"
    trial_verdict = "met" if data["per_trial_extra_max_s"] <= 5 else "not met"
    rows = [[f"engine alone, {data['epochs']} epochs with evaluation (reference)", f"{data['engine_s']:.1f}"],
            ["`ganpipe train`, same work, split by its report's `timings`:", f"{data['stage_s']:.1f}"],
            *[[f"∟ {name.replace('_', ' ')}", f"{seconds:.1f}"] for name, seconds in data["parts_s"].items()],
            [f"**train: fixed cost** (`ganpipe train` − engine alone; target ≤ 15% + 20 s ≈ "
             f"{data['fixed_target_s']:.0f} s)", f"**{data['fixed_s']:.1f}**: {verdict}"],
            [f"{data['trials']}-trial sweep, against {data['trials']} × engine alone "
             f"({data['trials'] * data['engine_trial_s']:.1f} s)", f"{data['sweep_s']:.1f}"],
            ["**sweep: per trial beyond its training** (target ≤ 5 s)",
             f"**{data['per_trial_extra_mean_s']:.1f} mean, {data['per_trial_extra_max_s']:.1f} max**: {trial_verdict}"]]
    return made_by("python benchmarks/overhead.py --data DATA_DIR/mnist --out OUT", data["machine"], data["date"],
                   "overhead-cpu.json") + table(["", "seconds"], rows)


LOOPS = {"a": "(a) tutorial: per-item transforms + DataLoader",
         "b": "(b) the engine, eager (data on the device, no per-step host sync)",
         "c": "(c) the engine, fastest path (CUDA graph + bf16 on CUDA; on CPU = b)"}


def cpu_throughput() -> str:
    """The tutorial loop against the engine on a CPU (benchmarks/throughput.py)."""
    data = load("throughput-cpu.json")
    rows = [[LOOPS[row["loop"]], row["batch"], f"{row['img_per_s']:,.0f}", f"{60_000 / row['img_per_s']:.0f}"]
            for row in data["rows"]]
    command = (f"python benchmarks/throughput.py --data DATA_DIR/mnist/{data['data']} --steps {data['steps']} "
               "--out OUT/throughput.json")
    return made_by(command, data["machine"], data["date"], "throughput-cpu.json") + \
        table(["loop", "batch", "img/s", "s per 60k epoch"], rows)


def variety(path: str, dataset: str, names: dict[str, str]) -> str:
    """A variety run of benchmarks/recipes.py (its command sits above the block): each row's figures after its
    last epoch beside the real-vs-real floor; ``names`` maps the JSON's rows to what the table calls them."""
    data = load(path)
    run = data["datasets"][dataset]
    floor = run["floor"]
    keys = ("fid", "precision", "recall", "recall_within_class", "cond_accuracy")

    def cells(scores: dict) -> list[str]:
        return [f"{scores['fid']:.2f}", *(f"{scores[key]:.2f}" for key in keys[1:-1]), f"{scores[keys[-1]]:.3f}"]

    rows = [[shown, *cells(run["rows"][name]["scores"][-1])] for name, shown in names.items()]
    rows.append(["real train vs test (floor)", *cells(floor)])
    machine = f"2-core CPU, 1 thread per run, evaluator {run['evaluator_test_accuracy']:.2%}"
    return (f"Machine: {machine}. Date: {data['date']}. n = {data['eval_samples']:,}. Data: [{path}]({path}).\n\n"
            + table(["row", "FID", "precision", "recall", "recall in class", "cond acc"], rows))


YARDSTICK_ROWS = {"real_vs_real": "real train vs test (floor)", "noise": "uniform noise (ceiling)",
                  "single_class": "class 0 only (mode collapse)"}


def yardstick() -> str:
    """Stand-in generators scored by an evaluator trained on 8k real test digits (benchmarks/quality_floor.py)."""
    data = load("quality-floor-cpu.json")
    rows = []
    for name, shown in YARDSTICK_ROWS.items():
        got = data["scores"][name]
        within = f"{got['recall_within_class']:.3f}" if "recall_within_class" in got else "-"
        rows.append([shown, f"{got['fid']:.2f}", f"{got['kid']:.4f}", f"{got['inception_score']:.2f}",
                     f"{got['class_coverage']:.2f}", f"{got['class_kl']:.3f}",
                     *(f"{got[key]:.3f}" for key in ("precision", "recall", "density", "coverage")), within])
    command = "python benchmarks/quality_floor.py --data DATA_DIR/mnist --threads 1 --device cpu --out OUT/floor.json"
    intro = (f"Evaluator: {data['evaluator_accuracy']:.2%} on the {data['held_out']:,} held-out digits, trained in "
             f"{data['evaluator_seconds']:.0f} s; n = {data['n']:,}.\n\n")
    return made_by(command, data["machine"], data["date"], "quality-floor-cpu.json") + intro + table(
        ["stand-in", "FID", "KID", "IS", "class coverage", "class KL", "precision", "recall", "density", "coverage",
         "recall within a class"], rows)


def variety_targets() -> str:
    """The default's row of the latest variety run against the targets, each read against that run's floor."""
    lines, verdicts = [], {}
    for dataset, accuracy in (("mnist", 0.95), ("fashion_mnist", 0.90)):
        run = load(f"variety-tacgan-{dataset}-1ep-cpu.json")["datasets"][dataset]
        got, floor = run["rows"]["default"]["scores"][-1], run["floor"]
        verdicts[dataset] = []
        for key, share in (("recall", 0.8), ("recall_within_class", 0.7)):
            need = share * floor[key]
            verdicts[dataset].append(f"{got[key]:.2f} against {need:.2f}: "
                                     + ("met" if got[key] >= need else f"missed by {need - got[key]:.2f}"))
        verdicts[dataset].append(f"{got['cond_accuracy']:.3f} against {accuracy:.2f}: "
                                 + ("met" if got["cond_accuracy"] >= accuracy else "missed"))
    names = ("recall ≥ 0.8 × floor", "recall within a class ≥ 0.7 × floor", "conditional accuracy")
    for index, name in enumerate(names):
        lines.append([name, verdicts["mnist"][index], verdicts["fashion_mnist"][index]])
    return table(["target", "MNIST", "Fashion-MNIST"], lines)


def variety_seeds(dataset: str) -> str:
    """The default and projection at three seeds: seed 0 from the kind run, 1 and 2 from the seeds run (the same
    evaluator: its training is deterministic, and both runs report the same accuracy)."""
    kind = load(f"variety-tacgan-{dataset}-1ep-cpu.json")
    seeds = load(f"variety-seeds-{dataset}-1ep-cpu.json")
    keys = ("fid", "recall", "recall_within_class", "cond_accuracy")
    rows = []
    for shown, zero, other in (("default (`acgan`)", "default", "default-seed"),
                               ("`projection`", "default+projection", "projection-seed")):
        measured = seeds["datasets"][dataset]["rows"]
        runs = {0: kind["datasets"][dataset]["rows"][zero]["scores"][-1],
                **{seed: measured[f"{other}{seed}"]["scores"][-1] for seed in (1, 2) if f"{other}{seed}" in measured}}
        for seed, scores in runs.items():
            rows.append([shown, seed, *(f"{scores[key]:.2f}" for key in keys[:-1]), f"{scores[keys[-1]]:.3f}"])
        runs = list(runs.values())
        means = [sum(run[key] for run in runs) / len(runs) for key in keys]
        rows.append([f"**{shown}, mean**", "", *(f"**{m:.2f}**" for m in means[:-1]), f"**{means[-1]:.3f}**"])
    path = f"variety-seeds-{dataset}-1ep-cpu.json"
    return (f"Machine: 2-core CPU, 1 thread per run. Date: {seeds['date']}. n = {seeds['eval_samples']:,}. "
            f"Data: [{path}]({path}) and the kind run's JSON.\n\n"
            + table(["row", "train.seed", "FID", "recall", "recall in class", "cond acc"], rows))


CLASS_WEIGHT_ROWS = {"default": "default (`class_weight` 1.0)", "acgan-cw0.3": "`class_weight` 0.3",
                     "acgan-cw0.1": "`class_weight` 0.1"}
KIND_ROWS = {"default": "default (`acgan`)", "default+tacgan": "`tacgan`", "default+projection": "`projection`"}
WIDE_ROWS = {"default": "default (`acgan`, `label_embedding` 16)", "projection-e64": "`projection`, `label_embedding` 64"}


TABLES = {"conditional-default": conditional_default,
          "variety-class-weight-mnist": lambda: variety("variety-mnist-1ep-cpu.json", "mnist", CLASS_WEIGHT_ROWS),
          "variety-class-weight-fashion_mnist": lambda: variety(
              "variety-fashion_mnist-1ep-cpu.json", "fashion_mnist",
              {k: v for k, v in CLASS_WEIGHT_ROWS.items() if k != "acgan-cw0.1"}),
          "variety-targets": variety_targets, "yardstick": yardstick,
          "variety-seeds-mnist": lambda: variety_seeds("mnist"),
          "variety-seeds-fashion_mnist": lambda: variety_seeds("fashion_mnist"),
          "variety-wide-mnist": lambda: variety("variety-projection-mnist-1ep-cpu.json", "mnist", WIDE_ROWS),
          "variety-wide-fashion_mnist": lambda: variety("variety-projection-fashion_mnist-1ep-cpu.json", "fashion_mnist",
                                                        WIDE_ROWS),
          "variety-kind-mnist": lambda: variety("variety-tacgan-mnist-1ep-cpu.json", "mnist", KIND_ROWS),
          "variety-kind-fashion_mnist": lambda: variety("variety-tacgan-fashion_mnist-1ep-cpu.json", "fashion_mnist",
                                                        KIND_ROWS), "overhead": overhead, "cpu-throughput": cpu_throughput, "readme-commands": readme_commands, "suite-time": suite_time, "cpu-scaling": cpu_scaling, "spool-outage": spool_outage, "make-demo": make_demo_stages, "gpu-engine": gpu_engine,
          "recipes-h100-mnist": lambda: recipes_h100("mnist"),
          "recipes-h100-fashion_mnist": lambda: recipes_h100("fashion_mnist"),
          "recipes-cpu": recipes_cpu, "sweep-mnist": sweep_mnist}


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + TABLES[m.group(2)]() + m.group(4), text)


def stale_blocks(page: Path) -> list[str]:
    text = page.read_text()
    return [f"{page.name}: table {m.group(2)}" for m in BLOCK.finditer(text)
            if m.group(2) not in TABLES or m.group(3) != TABLES[m.group(2)]()]


PAGES = [DOCS.parent / "README.md", *sorted(DOCS.glob("*.md"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say which tables differ from their JSON")
    args = parser.parse_args()
    if args.check:
        stale = [item for page in PAGES for item in stale_blocks(page)]
        print("\n".join(stale) or "every table matches its JSON")
        sys.exit(1 if stale else 0)
    for page in PAGES:
        text = page.read_text()
        if render(text) != text:
            page.write_text(render(text))
            print(f"rendered {page.name}")


if __name__ == "__main__":
    main()
