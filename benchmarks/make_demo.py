"""`make demo` as a newcomer runs it: a fresh clone, setup included, timed stage by stage.

    python benchmarks/make_demo.py --data-root DATA_DIR --out OUT

clones the repository's HEAD into OUT/ganpipe, runs `make demo` there with MNIST
read from DATA_DIR/mnist (a ``data.mirrors`` folder), and writes into OUT:
``make-demo.json`` (the total, each stage's seconds from the moment DVC started it,
the figures the run reached, the machine and the date), ``make-demo.log`` and
``demo-mnist.png``, the sample grid the demo wrote (`plots/samples/mnist.png`).
docs/tables.py renders the README's and the benchmarks page's figures from the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGE = re.compile(r"Running stage '([^']+)'")


def timed_make_demo(clone: Path, data_root: Path, log_path: Path) -> tuple[float, list[dict], int]:
    """Runs `make demo`; (total seconds, [{stage, started_s}], exit status), its output in ``log_path``."""
    mirror = f"-S 'data.mirrors.mnist=[{data_root.resolve() / 'mnist'}]'"
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    started = time.monotonic()
    starts = [{"stage": "setup", "started_s": 0.0}]
    with log_path.open("w") as log:
        process = subprocess.Popen(["make", "demo", f"DEMO_ARGS={mirror}"], cwd=clone, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in process.stdout:
            log.write(line)
            if match := STAGE.search(line):
                starts.append({"stage": match[1], "started_s": round(time.monotonic() - started, 1)})
        status = process.wait()
    return round(time.monotonic() - started, 1), starts, status


def stage_seconds(starts: list[dict], total: float) -> list[dict]:
    """Each stage's seconds: from its start to the next one's (the last to the end of make)."""
    ends = [item["started_s"] for item in starts[1:]] + [total]
    return [{"stage": item["stage"], "seconds": round(end - item["started_s"], 1)} for item, end in zip(starts, ends)]


def reached(clone: Path) -> dict:
    """The figures the demo's outputs hold."""
    def read(path: str) -> dict:
        return json.loads((clone / path).read_text())

    evaluator, train, sweep = read("metrics/mnist/evaluator.json"), read("metrics/mnist/train.json"), \
        read("metrics/sweep.json")
    return {"evaluator_accuracy": evaluator.get("test_accuracy"), "train_fid": train.get("fid"),
            "train_cond_accuracy": train.get("cond_accuracy"), "sweep_best_fid": sweep.get("best_fid")}


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, {gpu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True, help="a folder with mnist/ (its four IDX files)")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the clone and the results")
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"--out {args.out} exists: give a new folder")
    args.out.mkdir(parents=True)
    clone = args.out / "ganpipe"
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True,
                            check=True).stdout.strip()
    total, starts, status = timed_make_demo(clone, args.data_root, args.out / "make-demo.log")
    if status != 0:
        raise SystemExit(f"make demo exited {status}: see {args.out / 'make-demo.log'}")
    shutil.copy(clone / "plots/samples/mnist.png", args.out / "demo-mnist.png")
    result = {"date": datetime.date.today().isoformat(), "machine": machine(), "commit": commit,
              "command": "make demo DEMO_ARGS=\"-S 'data.mirrors.mnist=[DATA_DIR/mnist]'\" (a fresh clone)",
              "seconds": total, "stages": stage_seconds(starts, total), "reached": reached(clone)}
    (args.out / "make-demo.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
