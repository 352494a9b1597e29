"""The real pipeline on one GPU in one command: its stages, train, the data-parallel graph, shared sweeps, export.

    python benchmarks/gpu_pipeline.py --data DIR [--out /tmp/ganpipe-gpu] [--json gpu_pipeline.json]
    python benchmarks/gpu_pipeline.py --data DIR --device cpu --smoke     # a few minutes on CPU: is it whole?

DIR holds MNIST's four IDX .gz files. On a GPU machine without a package index,
``benchmarks/gpu_pipeline.sh`` unpacks the dependency bundle first (docs/gpu.md).
The JSON is rewritten after every section, so a cut-off run keeps what it measured:

  environment  the device (``gpu``), versions
  stages       fetch (a file mirror), preprocess, evaluator: wall seconds each
  train        ``ganpipe train --dataset mnist`` with the default params (10 epochs, one worker): wall
               seconds, the report's ``timings``, img/s and FID per epoch (next to the floor),
               ``cuda_graph``, ``graph_fallback_reason``, peak memory
  engine       the engine alone in this process on the same data and params: img/s, seconds per epoch
  dp_graph     one worker forced through the data-parallel graph path (the NCCL all-reduce that several
               GPUs run, captured in the graph) against eager mode from the same seed
  export       the generator that the run registered, loaded on the CPU by ``ganpipe sample --mlflow-run``
  sweep        the same 8-trial, 2-epoch sweep at each ``sweep.trials_per_gpu``: ``wall_s``,
               ``trials_per_hour``, ``trials_finished``, peak memory per trial process
  compare_train
               the train stage again with another ``model.conditional`` (``--compare``; default none, the
               unconditional GAN) at the same budget: FID (and ``cond_accuracy``) per epoch beside the
               default's, and for a conditional model a grid of one row per class drawn on the CPU

Sweeps run at 1, 8 and 4 trials per GPU, then the comparison run, then 2; no section starts after
``--deadline-s`` (460 s), so that the run ends inside the machine's 8 minutes with what it measured.
Pictures (the exported generator's grid; a conditional ``--compare``'s per-class grid) land beside the JSON.

The printed table checks issue 18's targets: fixed cost <= 15% + 20 s per stage, train >= 80% of the
engine's img/s, the best trials_per_gpu >= 3x the sweep throughput of one trial per GPU, and
``graph_fallback_reason`` null wherever the graph should run.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

from gan.conditioning import CONDITIONAL  # noqa: E402
from scratch import subset_mirror  # noqa: E402

MNIST_TRAIN = 60_000


class Report:
    """The JSON file, rewritten after every section."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def section(self, name: str, value) -> None:
        self.data[name] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


class MemoryPoll:
    """nvidia-smi twice a second: the device's peak MiB in use, and each process's (CUDA context included)."""

    def __init__(self):
        self.device_peak_mib: float | None = None
        self.process_peak_mib: dict[int, float] = {}
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
            used = _smi("--query-gpu=memory.used")
            if used:
                self.device_peak_mib = max(self.device_peak_mib or 0.0, float(used[0][0]))
            for pid, mib in _smi("--query-compute-apps=pid,used_memory"):
                if mib.replace(".", "").isdigit():
                    self.process_peak_mib[int(pid)] = max(self.process_peak_mib.get(int(pid), 0.0), float(mib))


def _smi(query: str) -> list[list[str]]:
    try:
        out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [[part.strip() for part in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def command(args: list[str], cwd: Path, log: Path, env: dict | None = None) -> float:
    """Run a project command as DVC would; its output goes to ``log``. Returns wall seconds."""
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(args, cwd=cwd, env={**tool_env(), **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode} after {seconds:.0f} s; log {log}:\n{tail}")
    print(f"  {' '.join(args)}: {seconds:.1f} s", flush=True)
    return seconds


def tool_env() -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
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
            subprocess.run(args, cwd=folder, check=True, capture_output=True)
    return folder


def no_git_shim(folder: Path) -> dict:
    """A ``git`` that fails, on PATH, where the machine has none: the pipeline then records the commit as unknown."""
    if shutil.which("git"):
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "git").write_text("#!/bin/sh\nexit 1\n")
    (folder / "git").chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{tool_env()['PATH']}"}


# ------------------------------------------------------------------------------------------------ sections


def environment(device: torch.device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    cuda = device.type == "cuda"
    return {"gpu": torch.cuda.get_device_name(device) if cuda else None, "device": str(device),
            "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1) if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
            **{name: installed(name) for name in ("ray", "mlflow", "dvc", "optuna")},
            "cpus": os.cpu_count(), "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M")}


def stages(repo: Path, logs: Path, env: dict) -> dict:
    return {stage: round(command(["ganpipe", stage, "--dataset", "mnist"], repo, logs / f"{stage}.log", env), 2)
            for stage in ("fetch", "preprocess", "evaluator")}


def train(repo: Path, logs: Path, env: dict) -> dict:
    with MemoryPoll() as memory:
        wall = command(["ganpipe", "train", "--dataset", "mnist"], repo, logs / "train.log", env)
    report = json.loads((repo / "metrics/train/mnist.json").read_text())
    yardstick = json.loads((repo / "metrics/evaluator/mnist.json").read_text())
    epochs = pd.read_csv(repo / "plots/quality/mnist.csv")
    return {"wall_s": round(wall, 2), "timings": report.get("timings", {}), "mlflow_run_id": report["mlflow_run_id"],
            "cuda_graph": report.get("cuda_graph"), "graph_fallback_reason": report.get("graph_fallback_reason"),
            "peak_memory_gib": report.get("peak_memory_gib"), "device_peak_mib": memory.device_peak_mib,
            "fid_floor": yardstick["real_vs_real"]["fid"], "status": report.get("status"),
            "epochs": epoch_rows(epochs)}


def epoch_rows(epochs: pd.DataFrame) -> list[dict]:
    """Per epoch: img/s and the evaluator's scores that the run logged (cond_accuracy on a conditional model)."""
    scores = [key for key in ("fid", "precision", "recall", "class_coverage", "cond_accuracy") if key in epochs]
    return [{"epoch": int(row["epoch"]), "img_per_s": round(float(row["images_per_sec"]), 1),
             **{key: round(float(row[key]), 4) for key in scores}} for _, row in epochs.iterrows()]


def compare_train(repo: Path, logs: Path, env: dict, conditional: str, pictures: Path) -> dict:
    """The train stage again with ``model.conditional`` set, at the same budget: issue 20's full-budget row.

    A conditional model's registered generator draws a grid of one row per class, on the CPU, into ``pictures``.
    """
    params_file = repo / "params.yaml"
    default = params_file.read_text()
    params = yaml.safe_load(default)
    params["model"]["conditional"] = conditional
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        wall = command(["ganpipe", "train", "--dataset", "mnist"], repo, logs / f"train-{conditional}.log", env)
    finally:
        params_file.write_text(default)
    report = json.loads((repo / "metrics/train/mnist.json").read_text())
    grid = {}
    if conditional != "none":
        path = pictures / f"gpu_{conditional}_per_class.png"
        command(["ganpipe", "sample", "--dataset", "mnist", "--mlflow-run", report["mlflow_run_id"], "--per-class",
                 "10", "-o", str(path)], repo, logs / "sample-per-class.log", {**env, "CUDA_VISIBLE_DEVICES": ""})
        grid = {"per_class_grid": path.name}
    return {"conditional": conditional, "wall_s": round(wall, 2), "mlflow_run_id": report["mlflow_run_id"], **grid,
            "cuda_graph": report.get("cuda_graph"), "graph_fallback_reason": report.get("graph_fallback_reason"),
            "status": report.get("status"), "epochs": epoch_rows(pd.read_csv(repo / "plots/quality/mnist.csv"))}


def engine_alone(repo: Path, device: torch.device, epochs: int) -> dict:
    """The train stage's work without the pipeline: the same model, params and data in this process."""
    from gan.data import DeviceBatches
    from gan.engine import EngineConfig, GANTrainer
    from gan.metrics import evaluate
    from pipeline.config import load_config
    from pipeline.evaluator import load_reference
    from pipeline.preprocess import load_processed
    from pipeline.train import build_generator_and_discriminator

    cfg = load_config(repo / "params.yaml")
    arrays = load_processed("mnist", repo)
    evaluator, reference = load_reference("mnist", repo, device, arrays)
    torch.manual_seed(cfg.train.seed)
    generator, discriminator = build_generator_and_discriminator(cfg.model, "mnist")
    batches = DeviceBatches(torch.from_numpy(arrays["x_train"]).to(device), cfg.train.batch_size, seed=cfg.train.seed)
    trainer = GANTrainer(generator, discriminator, EngineConfig.from_mapping(cfg.train.model_dump()), device=device,
                         seed=cfg.train.seed + 1000)
    rows = []
    for epoch in range(1, epochs + 1):
        result = trainer.train_epoch(batches)
        started = time.perf_counter()
        evaluate(trainer.sample, evaluator, reference, n=cfg.train.eval_samples, device=device)
        rows.append({"epoch": epoch, "train_s": round(result.seconds, 3), "img_per_s": round(result.images_per_sec, 1),
                     "eval_s": round(time.perf_counter() - started, 3)})
    if trainer.graph is not None:
        trainer.graph.reset()
    later = rows[1:] or rows  # epoch 1 holds the warm-up and the capture
    per_epoch = sum(r["train_s"] + r["eval_s"] for r in later) / len(later)
    return {"epochs": rows, "img_per_s": round(sum(r["img_per_s"] for r in later) / len(later), 1),
            "cuda_graph": trainer.use_graph, "graph_fallback_reason": trainer.graph_fallback_reason,
            # what the train stage's epochs would cost here: the first as measured, the rest at the later mean
            "seconds_for_train_epochs": round(rows[0]["train_s"] + rows[0]["eval_s"]
                                              + per_epoch * (cfg.train.epochs - 1), 2)}


def dp_graph(repo: Path, device: torch.device, iterations: int) -> dict:
    """One rank through the data-parallel path (``gan.parallel``): graph with the all-reduce vs eager, same seed.

    The process group is set up as Ray Train sets it up (no ``device_id``: the NCCL
    communicator is created lazily) with NCCL async error handling off, as the
    pipeline asks of Ray's workers. On one GPU only world size 1 can run: it checks
    the capture and the step's numbers, not a cross-rank sum.
    """
    import numpy as np
    import torch.distributed as dist

    from gan.data import DeviceBatches
    from gan.engine import EngineConfig, GANTrainer
    from gan.parallel import GradientAllReduce
    from pipeline.config import load_config
    from pipeline.preprocess import load_processed
    from pipeline.train import build_generator_and_discriminator

    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    cfg = load_config(repo / "params.yaml")
    data = torch.from_numpy(load_processed("mnist", repo)["x_train"]).to(device)
    runs, curves = [], {}
    try:
        for name, graph, all_reduce in (("graph + all-reduce", True, True), ("eager + all-reduce", False, True),
                                        ("eager", False, False)):
            torch.manual_seed(cfg.train.seed)
            generator, discriminator = (m.to(device) for m in build_generator_and_discriminator(cfg.model, "mnist"))
            sync = GradientAllReduce.broadcasting(generator, discriminator) if all_reduce else None
            config = EngineConfig.from_mapping({**cfg.train.model_dump(), "cuda_graph": graph, "log_every": 1})
            trainer = GANTrainer(generator, discriminator, config, device=device, seed=cfg.train.seed + 1000,
                                 gradient_sync=sync)
            batches = itertools.islice(DeviceBatches(data, cfg.train.batch_size, seed=cfg.train.seed), iterations)
            result = trainer.train_epoch(batches)
            curves[name] = np.array([[row["loss_d"], row["loss_g"]] for row in result.history])
            runs.append({"run": name, "graph_ran": trainer.use_graph, "graph_fallback_reason":
                         trainer.graph_fallback_reason, "img_per_s_with_a_read_back_per_step":
                         round(result.images_per_sec, 1)})
            if trainer.graph is not None:
                trainer.graph.reset()  # before destroy_process_group: NCCL 2.26+ hangs with a live graph
    finally:
        dist.destroy_process_group()
    difference = np.abs(curves["graph + all-reduce"] - curves["eager"])
    return {"iterations": iterations, "runs": runs,
            # iterations 1-3 are eager warm-ups in both; 4 is the first (checked) replay
            "abs_diff_iteration_4": difference[3].tolist() if len(difference) > 3 else None,
            "max_abs_diff_iterations_4_to_20": float(difference[3:20].max()) if len(difference) > 3 else None,
            "max_abs_diff_all": float(difference.max()),
            "eager_all_reduce_equals_eager": bool(np.array_equal(curves["eager + all-reduce"], curves["eager"])),
            "mean_loss_d_g_last_50": {name: curve[-50:].mean(0).round(4).tolist() for name, curve in curves.items()}}


def export(repo: Path, logs: Path, run_id: str, env: dict, pictures: Path) -> dict:
    """The registered generator of the run, loaded on the CPU (no CUDA visible), sampled into a grid."""
    grid = pictures / "gpu_export_grid.png"
    seconds = command(["ganpipe", "sample", "--dataset", "mnist", "--mlflow-run", run_id, "-o", str(grid)], repo,
                      logs / "export.log", {**env, "CUDA_VISIBLE_DEVICES": ""})
    return {"mlflow_run_id": run_id, "loaded_on": "cpu", "seconds": round(seconds, 2), "grid": grid.name,
            "grid_written": grid.exists() and grid.read_bytes().startswith(b"\x89PNG")}


def sweep(repo: Path, logs: Path, per_gpu: int, env: dict) -> dict:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["sweep"]["trials_per_gpu"] = per_gpu
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with MemoryPoll() as memory:
        wall = command(["ganpipe", "sweep", "--fresh"], repo, logs / f"sweep-{per_gpu}.log", env)
    table = pd.read_csv(repo / "sweep/results.csv")
    finished = int((table["status"] == "completed").sum())
    trial_peaks = sorted(memory.process_peak_mib.values())
    return {"trials_per_gpu": per_gpu, "wall_s": round(wall, 2), "trials": len(table), "trials_finished": finished,
            "trials_per_hour": round(finished / wall * 3600, 1), "statuses": table["status"].value_counts().to_dict(),
            "errors": [error for error in table.get("error", []) if isinstance(error, str) and error],
            "peak_memory_per_trial_mib": trial_peaks[-1] if trial_peaks else None,
            "trial_processes_seen": len(trial_peaks), "device_peak_mib": memory.device_peak_mib}


# ------------------------------------------------------------------------------------------------ the run


def adjust_for(args, device: torch.device):
    """params.yaml's default, with the smoke test's tiny budget when asked; the sweep as issue 18 times it."""

    def adjust(params: dict) -> None:
        params["ray"]["use_gpu"] = "auto" if device.type == "cuda" else False
        # The same 8 trials at every trials_per_gpu, each trained to the end: FIFO, a fixed seed.
        params["sweep"].update(epochs=args.sweep_epochs, scheduler="fifo", search="random", num_workers=1,
                               max_concurrent_trials=max(args.trials_per_gpu), seed=0)
        if args.smoke:
            params["model"]["channels"] = 8
            params["evaluator"]["epochs"] = 1
            params["train"].update(epochs=2, eval_samples=300, log_every=10)
            params["sweep"].update(num_samples=1, space={"lr_d": [2e-4, 4e-4]})

    return adjust


def guarded(report: Report, name: str, make, deadline: float | None = None):
    """Run a section and save it; a section that fails is saved as its error, and the run goes on.

    Past ``deadline`` (a ``time.perf_counter()`` value) the section is not started: it is saved as skipped,
    so that the run ends inside the machine's time with what it measured.
    """
    started = time.perf_counter()
    if deadline is not None and started > deadline:
        print(f"{name} skipped: past the run's deadline", flush=True)
        report.section(name, {"skipped": "past --deadline-s"})
        return {"skipped": "past --deadline-s"}
    print(f"{name} ...", flush=True)
    try:
        value = make()
    except Exception as err:  # noqa: BLE001 - keep what the other sections measure
        value = {"error": f"{type(err).__name__}: {err}"[-3000:]}
        print(f"{name} failed: {value['error']}", flush=True)
    if isinstance(value, dict):
        value.setdefault("section_s", round(time.perf_counter() - started, 1))
    report.section(name, value)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # this process's cache would shrink the sweep trials' shares
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a folder with MNIST's four IDX .gz files")
    parser.add_argument("--out", type=Path, default=Path("/tmp/ganpipe-gpu"), help="scratch folder (must not exist)")
    parser.add_argument("--json", type=Path, default=Path("gpu_pipeline.json"))
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test the script")
    parser.add_argument("--smoke", action="store_true", help="a tiny budget: 2000 images, DCGAN-8, 2 trials")
    parser.add_argument("--engine-epochs", type=int, default=3, help="epochs of the engine alone")
    parser.add_argument("--dp-iterations", type=int, default=200, help="iterations of the data-parallel check")
    parser.add_argument("--trials-per-gpu", type=int, nargs="+",
                        help="sweeps to run, in this order (default 1 8 4 2: the extremes first, in case the run is "
                             "cut off; smoke: 1 2)")
    parser.add_argument("--sweep-epochs", type=int, default=2)
    parser.add_argument("--sweep-train-images", type=int, default=20_000,
                        help="the sweeps' train split (a third of MNIST: four sweeps fit the 8 minutes)")
    parser.add_argument("--compare", default="none", choices=[*CONDITIONAL, "skip"],
                        help="after the sweeps, the train stage again with this model.conditional (default none: "
                             "the unconditional GAN beside the default acgan)")
    parser.add_argument("--deadline-s", type=float, default=460,
                        help="start no section after this many seconds of the run (the machine's time is short)")
    args = parser.parse_args()
    args.trials_per_gpu = args.trials_per_gpu or ([1, 2] if args.smoke else [1, 8, 4, 2])
    if args.smoke:
        args.engine_epochs, args.dp_iterations, args.sweep_epochs = 2, 20, 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here (--device cpu --smoke tests the script)")
    if device.type == "cpu":
        torch.set_num_threads(1)  # as a Ray worker of one CPU: the engine alone at equal threads
    out = args.out.resolve()
    if out.exists():
        raise SystemExit(f"--out {out} exists: name a new folder")
    logs = out / "logs"
    logs.mkdir(parents=True)
    started = time.perf_counter()
    report = Report(args.json.resolve())
    report.section("environment", {**environment(device), "mode": "smoke" if args.smoke else "full",
                                   "command": " ".join(sys.argv[1:])})
    env = no_git_shim(out / "bin")
    adjust = adjust_for(args, device)
    train_images = 2000 if args.smoke else MNIST_TRAIN
    repo = scratch_project(out / "project", args.data, train_images, adjust)

    guarded(report, "stages", lambda: stages(repo, logs, env))
    trained = guarded(report, "train", lambda: train(repo, logs, env))
    guarded(report, "engine", lambda: engine_alone(repo, device, args.engine_epochs))
    guarded(report, "dp_graph", lambda: dp_graph(repo, device, args.dp_iterations))
    if "mlflow_run_id" in trained:
        guarded(report, "export", lambda: export(repo, logs, trained["mlflow_run_id"], env, report.path.parent))

    sweep_images = min(train_images, args.sweep_train_images)
    sweep_repo = repo  # the same data: the train project's stages serve
    if sweep_images < train_images:
        sweep_repo = scratch_project(out / "sweep-project", args.data, sweep_images, adjust)
        (logs / "sweep").mkdir()
        guarded(report, "sweep_stages", lambda: {"train_images": sweep_images,
                                                 **stages(sweep_repo, logs / "sweep", env)})
    deadline = None if args.smoke else started + args.deadline_s
    # The comparison run goes after the first three sweeps (1, 8 and the default 4 trials per GPU): the
    # shares' comparison comes first, and the deadline cuts what is left.
    sections = [(f"sweep_{n}", functools.partial(sweep, sweep_repo, logs, n, env)) for n in args.trials_per_gpu]
    if args.compare != "skip":
        sections.insert(min(3, len(sections)), ("compare_train", functools.partial(
            compare_train, repo, logs, env, args.compare, report.path.parent)))
    rows = []
    for name, make in sections:
        value = guarded(report, name, make, deadline)
        if name.startswith("sweep_"):
            rows.append(value)
            report.section("sweep", [row for row in rows if "error" not in row and "skipped" not in row])
    report.section("wall_s", round(time.perf_counter() - started, 1))
    print_table(report.data)
    print(f"\nJSON: {report.path}")


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def print_table(data: dict) -> None:
    env = data["environment"]
    print(f"\n{env['gpu'] or env['device']} ({env['gpu_memory_gib']} GiB), {env['cpus']} CPUs, torch {env['torch']}, "
          f"CUDA {env['cuda']}, NCCL {env['nccl']}, Ray {env['ray']}, MLflow {env['mlflow']}; {env['mode']} run, "
          f"{data.get('wall_s', '?')} s in all")
    train, engine = data.get("train", {}), data.get("engine", {})
    print("\n| stage | wall s |\n| --- | --- |")
    for stage, seconds in {**{k: v for k, v in data.get("stages", {}).items() if k != "section_s"},
                           "train": train.get("wall_s")}.items():
        print(f"| {stage} | {seconds} |")
    if "epochs" in train:
        print("\n| epoch | img/s inside Ray | FID | floor |\n| --- | --- | --- | --- |")
        for row in train["epochs"]:
            print(f"| {row['epoch']} | {row['img_per_s']:,.0f} | {row['fid']:.3f} | {train['fid_floor']:.3f} |")
        later = train["epochs"][1:] or train["epochs"]
        ray_rate = sum(r["img_per_s"] for r in later) / len(later)
        print("\n| figure | value | target |\n| --- | --- | --- |")
        print(f"| train img/s inside Ray (epochs 2+) / engine alone | {ray_rate:,.0f} / "
              f"{engine.get('img_per_s', float('nan')):,.0f} = {_ratio(ray_rate, engine.get('img_per_s'))} | >= 0.80 |")
        reference = engine.get("seconds_for_train_epochs")
        if reference:
            fixed = train["wall_s"] - reference
            print(f"| train fixed cost: stage {train['wall_s']:.1f} s - engine {reference:.1f} s | {fixed:.1f} s "
                  f"| <= {0.15 * reference + 20:.1f} s ({'met' if fixed <= 0.15 * reference + 20 else 'missed'}) |")
        print(f"| peak memory, train worker (allocated) / device (nvidia-smi) | {train.get('peak_memory_gib')} GiB / "
              f"{train.get('device_peak_mib')} MiB | |")
        print("| where the stage's seconds went | " + ", ".join(f"{k.removesuffix('_s')} {v}"
                                                              for k, v in train.get("timings", {}).items()) + " | |")
    dp = data.get("dp_graph", {})
    print("\n| run that should use the graph | cuda_graph | graph_fallback_reason |\n| --- | --- | --- |")
    print(f"| train stage (Ray worker) | {train.get('cuda_graph')} | {train.get('graph_fallback_reason')} |")
    print(f"| engine alone | {engine.get('cuda_graph')} | {engine.get('graph_fallback_reason')} |")
    for run in dp.get("runs", []):
        if run["run"].startswith("graph"):
            print(f"| data-parallel graph (1 rank) | {run['graph_ran']} | {run['graph_fallback_reason']} |")
    if "runs" in dp:
        print(f"data-parallel graph vs eager, {dp['iterations']} iterations: |diff| at the first replay "
              f"{dp['abs_diff_iteration_4']}, max over 4-20 {dp['max_abs_diff_iterations_4_to_20']}, last-50 means "
              f"{dp['mean_loss_d_g_last_50']}; eager with the all-reduce == eager: {dp['eager_all_reduce_equals_eager']}")
    rows = data.get("sweep", [])
    if rows:
        base = next((r["trials_per_hour"] for r in rows if r["trials_per_gpu"] == 1), None)
        print("\n| trials_per_gpu | wall s | trials finished | trials/hour | vs 1 per GPU | peak MiB per trial |")
        print("| --- | --- | --- | --- | --- | --- |")
        for row in sorted(rows, key=lambda r: r["trials_per_gpu"]):
            print(f"| {row['trials_per_gpu']} | {row['wall_s']} | {row['trials_finished']}/{row['trials']} "
                  f"| {row['trials_per_hour']} | {_ratio(row['trials_per_hour'], base)} "
                  f"| {row['peak_memory_per_trial_mib']} |")
        best = max(rows, key=lambda r: r["trials_per_hour"])
        print(f"best: trials_per_gpu {best['trials_per_gpu']}, {_ratio(best['trials_per_hour'], base)}x one trial "
              "per GPU (target >= 3)")
    compared = data.get("compare_train", {})
    if "epochs" in compared and "epochs" in train:
        other, default = compared["epochs"][-1], train["epochs"][-1]
        print(f"\nat the train stage's budget ({default['epoch']} epochs): FID {default['fid']:.3f} with the default "
              f"(cond_accuracy {default.get('cond_accuracy')}), {other['fid']:.3f} with "
              f"model.conditional={compared['conditional']} ({other['fid'] / default['fid'] - 1:+.0%}; cond_accuracy "
              f"{other.get('cond_accuracy')}); graph_fallback_reason {compared['graph_fallback_reason']}")
    if "export" in data:
        print(f"\nexport: {data['export']}")
    failed = [name for name, value in data.items() if isinstance(value, dict) and "error" in value]
    if failed:
        print(f"\nsections that failed (their error is in the JSON): {', '.join(failed)}")


if __name__ == "__main__":
    main()
