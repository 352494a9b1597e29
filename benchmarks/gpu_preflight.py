"""Before the GPU run: unpack the dependency bundle, then check in seconds what the stages will need.

    python3 benchmarks/gpu_preflight.py --json gpu_pipeline.json [--bundle .gpu-bundle/site.tar.xz --site DIR]

Imports what the stages import (Ray Train and Tune, the Ray dashboard's packages,
pyarrow's file systems, MLflow, Optuna, DVC) and runs ``nvidia-smi``; writes what failed
into the JSON under ``preflight`` before any stage starts, so that a run cut short
still says why. Standard library only: it runs before the bundle is on the path.
Python's ``tarfile`` unpacks the bundle, so the machine needs no ``xz``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

# What the stages import; ray.dashboard.optional_deps is what Ray's dashboard needs (aiohttp, grpc, opencensus ...).
MODULES = ("torch", "yaml", "pydantic", "ray.train.torch", "ray.tune", "ray.dashboard.optional_deps", "pyarrow.fs",
           "mlflow", "optuna", "dvc.repo")


def unpack(bundle: Path, site: Path) -> float:
    started = time.perf_counter()
    site.mkdir(parents=True, exist_ok=True)
    with tarfile.open(bundle) as archive:  # xz, gz or plain: tarfile reads them all
        archive.extractall(site, filter="fully_trusted")  # our own bundle: its links and modes as packed
    return round(time.perf_counter() - started, 1)


def check_imports() -> dict[str, str]:
    failed = {}
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any failure to import is what the run must know
            failed[name] = f"{type(err).__name__}: {err}"[:500]
    return failed


def gpus() -> tuple[list[str], str | None]:
    """nvidia-smi's line per GPU, and why it failed, if it did."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as err:
        return [], f"{type(err).__name__}: {err}"
    lines = done.stdout.strip().splitlines()
    return lines, None if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[:500]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="the run's JSON: written afresh, with preflight")
    parser.add_argument("--bundle", type=Path, help="the dependency bundle to unpack (site.tar.xz)")
    parser.add_argument("--site", type=Path, help="where to unpack it; put on sys.path for the checks")
    args = parser.parse_args()
    started = time.perf_counter()
    report: dict = {}
    if args.bundle:
        report["unpack_s"] = unpack(args.bundle, args.site)
    if args.site:
        sys.path.insert(0, str(args.site))
    failed = check_imports()
    report["gpus"], smi_error = gpus()
    if smi_error:
        failed["nvidia-smi"] = smi_error
    report.update(failed=failed, seconds=round(time.perf_counter() - started, 1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"preflight": report}, indent=2) + "\n")
    print(f"preflight: {', '.join(report['gpus']) or 'no GPU seen'}; "
          + (f"failed: {json.dumps(failed)}" if failed else "every import works"), flush=True)


if __name__ == "__main__":
    main()
