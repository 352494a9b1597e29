"""The figures tables of the docs, rendered from the committed JSON that measured them.

A page holds a table between two markers:

    <!-- table: conditional-default -->
    | ... rendered rows ... |
    <!-- /table -->

``python docs/tables.py`` rewrites every such block from its JSON; ``python docs/tables.py --check`` exits 1
naming each block that differs (tests/test_docs.py runs the check). A figure in a table is only ever the
JSON's: to change one, measure again and commit the JSON the benchmark wrote.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
BLOCK = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)
MACHINE_2CORE = "2-core CPU, 1 thread"


def last_scores(path: str, dataset: str, row: str) -> tuple[dict, dict]:
    """The row's scores at its last scored epoch, and the JSON's top level."""
    data = json.loads((DOCS / path).read_text())
    return data["datasets"][dataset]["rows"][row]["scores"][-1], data


def conditional_default() -> str:
    """The default (acgan, label_embedding 16) against the same GAN unconditional, at two CPU budgets."""
    # (JSON, dataset, the row's name in the JSON, its name today, budget, the recipes.py command)
    runs = []
    for ds, short in (("mnist", "MNIST"), ("fashion_mnist", "Fashion-MNIST")):
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
    lines = ["| dataset | budget | row | FID | precision | recall | cond acc | command (`benchmarks/recipes.py "
             "--data-root DIR --device cpu --out-dir OUT ...`) | machine | date | JSON |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path, ds, short, row, shown, budget, command in runs:
        s, data = last_scores(path, ds, row)
        acc = f"{s['cond_accuracy']:.3f}" if "cond_accuracy" in s else "-"
        lines.append(f"| {short} | {budget} | {shown} | {s['fid']:.2f} | {s['precision']:.2f} | {s['recall']:.2f} "
                     f"| {acc} | `{command}` | {MACHINE_2CORE} | {data['date']} | [JSON]({path}) |")
    return "\n".join(lines) + "\n"


def gpu_engine() -> str:
    """The engine alone on one GPU: img/s of DCGAN-28 on the 60k MNIST images, 1 D + 1 G update per batch."""
    data = json.loads((DOCS / "gpu-check-h100.json").read_text())
    env = data["environment"]
    machine = f"{env['gpu']}, torch {env['torch']}"
    lines = ["| loop | batch | img/s | s per 60k epoch | command | machine | date |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for item in data["throughput"]:
        if item["loop"].startswith("fastest"):  # a copy of the best row
            continue
        lines.append(f"| {item['loop']} | {item['batch']} | {item['img_per_s']:,.0f} | "
                     f"{60_000 / item['img_per_s']:.2f} | `benchmarks/gpu_check.py --data-root DIR --epochs 3 "
                     f"--out OUT/gpu_check.json` | {machine} | {env['date']} |")
    return "\n".join(lines) + "\n"


TABLES = {"conditional-default": conditional_default, "gpu-engine": gpu_engine}


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + TABLES[m.group(2)]() + m.group(4), text)


def stale_blocks(page: Path) -> list[str]:
    text = page.read_text()
    return [f"{page.name}: table {m.group(2)}" for m in BLOCK.finditer(text)
            if m.group(2) not in TABLES or m.group(3) != TABLES[m.group(2)]()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say which tables differ from their JSON")
    args = parser.parse_args()
    pages = sorted(DOCS.glob("*.md"))
    if args.check:
        stale = [item for page in pages for item in stale_blocks(page)]
        print("\n".join(stale) or "every table matches its JSON")
        sys.exit(1 if stale else 0)
    for page in pages:
        text = page.read_text()
        if render(text) != text:
            page.write_text(render(text))
            print(f"rendered {page.name}")


if __name__ == "__main__":
    main()
