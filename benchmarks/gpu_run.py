"""The GPU benchmark's machinery: its time plan, commands cut at their budget, the JSON report, scratch projects.

``benchmarks/gpu_pipeline.py`` holds the sections; this module makes sure that none of them can overrun.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

from scratch import subset_mirror  # noqa: E402

MNIST_TRAIN = 60_000
# Seconds a section may take (GPU run, CPU smoke). On the GPU they add up to the 8-minute call with the
# unpacking; on a CPU they only cut a hung section.
BUDGET_S = {"stages": (45, 120), "train": (100, 180), "engine": (40, 90), "sweep_stages": (30, 120),
            "sweep": (90, 180), "dp_graph": (25, 90), "export": (20, 60), "compare_train": (100, 180)}
GIT_TIMEOUT_S = 30
ALARM_GRACE_S = 10  # a section's alarm waits this long past its budget: a subprocess's own timeout says more


class Report:
    """The JSON file, rewritten after every section."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def section(self, name: str, value) -> None:
        self.data[name] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


class SectionOverrun(BaseException):
    """A section ran past its budget. Not an Exception, so that no broad ``except`` in the pipeline hides it."""


class Plan:
    """The run's clock: a section starts only if its budget fits before the deadline, and it is cut at its budget.

    A failed section is saved as its error, a skipped one as why, and the run goes on.
    """

    section_end = math.inf  # of the running section (one plan per process): command() times out there

    def __init__(self, report: Report, started: float, deadline_s: float, smoke: bool):
        self.report, self.deadline, self.smoke = report, started + deadline_s, smoke

    def run(self, name: str, make, budget: str | None = None) -> dict:
        budget_s = BUDGET_S[budget or name][self.smoke]
        now = time.time()
        if now + budget_s > self.deadline:
            value = {"skipped": f"its budget of {budget_s} s does not fit the {self.deadline - now:.0f} s left"}
            print(f"{name} skipped: {value['skipped']}", flush=True)
            self.report.section(name, value)
            return value
        print(f"{name} ... (budget {budget_s} s)", flush=True)
        Plan.section_end = now + budget_s
        signal.signal(signal.SIGALRM, _overrun)
        signal.setitimer(signal.ITIMER_REAL, budget_s + ALARM_GRACE_S)
        try:
            value = make()
        except (Exception, SectionOverrun) as err:  # noqa: BLE001 - keep what the other sections measure
            value = {"error": f"{type(err).__name__}: {err}"[-3000:]}
            print(f"{name} failed: {value['error']}", flush=True)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            Plan.section_end = math.inf
        value.setdefault("section_s", round(time.time() - now, 1))
        self.report.section(name, value)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # this process's cache would shrink the sweep trials' shares
        return value


def _overrun(signum, frame):
    raise SectionOverrun("ran past its budget")


class MemoryPoll:
    """nvidia-smi twice a second: the device's peak MiB in use (a process's own figure is empty in containers)."""

    def __init__(self):
        self.device_peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "MemoryPoll":
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            try:
                used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=10).stdout.split()
            except (OSError, subprocess.TimeoutExpired):
                continue
            if used and used[0].replace(".", "").isdigit():
                self.device_peak_mib = max(self.device_peak_mib or 0.0, float(used[0]))


def command(args: list[str], cwd: Path, log: Path, env: dict | None = None) -> float:
    """Run a project command as DVC would, cut at its section's budget; output goes to ``log``. Returns wall seconds."""
    timeout = max(Plan.section_end - time.time(), 1.0) if Plan.section_end < math.inf else None
    started = time.perf_counter()
    with log.open("w") as out:
        # Its own process group: a timeout takes down the Ray processes it started too.
        process = subprocess.Popen(args, cwd=cwd, env={**tool_env(cwd), **(env or {})}, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = f"ran past its section's budget ({timeout:.0f} s)"
        finally:
            if process.poll() is None:  # a timeout or the section's alarm: the Ray processes it started go too
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    seconds = time.perf_counter() - started
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        said = code if isinstance(code, str) else f"exited {code}"
        raise RuntimeError(f"{' '.join(args)} {said} after {seconds:.0f} s; log {log}:\n{tail}")
    print(f"  {' '.join(args)}: {seconds:.1f} s", flush=True)
    return seconds


def tool_env(project: Path | None = None) -> dict:
    """This Python's tools first; with ``project``, its own copy of the code before any installed one."""
    path = [str(project)] if project else []
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(path + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
           "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the scratch project's own SQLite store
    return env


def scratch_project(folder: Path, data: Path, train_images: int, params_update) -> Path:
    """A project folder (git when the machine has it) with the pipeline and the default params.yaml, adjusted.

    The mirror is ``data`` itself (checksums verified) unless the train split is cut.
    """
    if train_images < MNIST_TRAIN:
        mirror = folder.parent / f"{folder.name}-mirror"
        subset_mirror(data, mirror, train_images)
    else:
        mirror = data.resolve()
    folder.mkdir(parents=True)
    for package in ("gan", "pipeline", "presets"):
        shutil.copytree(REPO / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", folder)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(datasets=["mnist"], mirrors={"mnist": [str(mirror)]},
                          verify_checksums=train_images >= MNIST_TRAIN)
    params["ray"].update(num_workers=1)
    params_update(params)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if shutil.which("git"):  # the run's lineage tags; without git they read "unknown"
        for args in (["git", "init", "-q"], ["git", "add", "-A"],
                     ["git", "-c", "user.name=ganpipe", "-c", "user.email=ganpipe@localhost", "commit", "-qm", "scratch"]):
            subprocess.run(args, cwd=folder, check=True, capture_output=True, timeout=GIT_TIMEOUT_S)
    return folder


def no_git_shim(folder: Path) -> dict:
    """A ``git`` that fails, on PATH, where the machine has none: the pipeline then records the commit as unknown."""
    if shutil.which("git"):
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "git").write_text("#!/bin/sh\nexit 1\n")
    (folder / "git").chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{tool_env()['PATH']}"}
