"""The real pipeline on one GPU in one command: its stages, train, the engine alone, shared sweeps, the data-parallel
graph, export.

    python benchmarks/gpu_pipeline.py --data DIR --json OUT/gpu_pipeline.json [--out /tmp/ganpipe-gpu]
    python benchmarks/gpu_pipeline.py --data DIR --json OUT/smoke.json --device cpu --smoke  # a few minutes on CPU: is it whole?

DIR holds MNIST's four IDX .gz files. On a GPU machine without a package index,
``benchmarks/gpu_pipeline.sh`` unpacks the dependency bundle and checks its imports first (docs/gpu.md).
The JSON is rewritten after every section, so a cut-off run keeps what it measured:

  environment  the device (``gpu``), versions; ``preflight``: what the wrapper found missing
  stages       fetch (a file mirror), preprocess, evaluator: wall seconds each
  train        ``ganpipe train --dataset mnist`` with the default params (one worker, ``ray.use_gpu: true`` with
               ``--device cuda``: no fall-back to the CPU): wall seconds, the report's ``timings``, img/s and FID
               per epoch (next to the floor), ``cuda_graph``, ``graph_fallback_reason``, peak memory
  engine       the engine alone in this process on the same data and params: img/s, seconds per epoch
  sweep_<n>    the same 8-trial, 2-epoch sweep at ``sweep.trials_per_gpu`` n: ``wall_s``, ``trials_per_hour``,
               ``trials_finished``, and per trial (from results.csv) ``cuda_graph``, ``graph_fallback_reason``,
               ``peak_memory_gib``
  dp_graph     one worker forced through the data-parallel graph path (the NCCL all-reduce that several
               GPUs run, captured in the graph) against eager mode from the same seed
  export       the generator that the run registered, loaded on the CPU by ``ganpipe sample --mlflow-run``
  compare_train
               the train stage again with another ``model.conditional`` (``--compare``; default none)

The time plan: every section has a budget (``BUDGET_S``) and starts only if the time used plus its budget fits
under ``--deadline-s``, counted from this script's first line or from ``--started-at`` (the wrapper's start,
so that unpacking counts). A section is cut at its budget: a subprocess by its timeout (its process group
killed), this process's own work by an alarm. Sections run in order of value: the train stage, the engine
beside it, the sweep at 1 and at the default trials per GPU, the data-parallel graph, the export; then the
other sweeps and the comparison run if time is left. Pictures (the exported generator's grid; a conditional
``--compare``'s per-class grid) land beside the JSON.
"""

from __future__ import annotations

import time

STARTED = time.time()  # the run's clock starts at the script's first line (unless --started-at says earlier)

import argparse  # noqa: E402
import functools  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

from gan.conditioning import CONDITIONAL  # noqa: E402
from gpu_run import MNIST_TRAIN, MemoryPoll, Plan, Report, command, no_git_shim, scratch_project  # noqa: E402
from gpu_table import print_table  # noqa: E402



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
    """The train stage again with ``model.conditional`` set, at the same budget as the default's run.

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
    from pipeline.yardstick import load_reference
    from pipeline.artifacts import load_processed
    from pipeline.modeling import build_generator_and_discriminator

    cfg = load_config(repo / "params.yaml")
    arrays = load_processed("mnist", repo)
    evaluator, reference = load_reference("mnist", repo, device, arrays)
    torch.manual_seed(cfg.train.seed)
    generator, discriminator = build_generator_and_discriminator(cfg.model, "mnist")
    batches = DeviceBatches(torch.from_numpy(arrays["x_train"]).to(device), cfg.train.batch_size, seed=cfg.train.seed,
                            labels=class_labels(cfg, arrays, device))
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


def class_labels(cfg, arrays: dict, device: torch.device) -> torch.Tensor | None:
    """The train split's labels on ``device`` for a class-conditional model (the default AC-GAN), else None."""
    return torch.from_numpy(arrays["y_train"]).to(device) if cfg.model.conditional != "none" else None


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
    from pipeline.artifacts import load_processed
    from pipeline.modeling import build_generator_and_discriminator

    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    cfg = load_config(repo / "params.yaml")
    arrays = load_processed("mnist", repo)
    data, labels = torch.from_numpy(arrays["x_train"]).to(device), class_labels(cfg, arrays, device)
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
            batches = itertools.islice(DeviceBatches(data, cfg.train.batch_size, seed=cfg.train.seed, labels=labels),
                                       iterations)
            try:
                result = trainer.train_epoch(batches)
            finally:
                if trainer.graph is not None:  # before destroy_process_group, error or not: NCCL 2.26+ hangs
                    trainer.graph.reset()  # in it while a graph lives
            curves[name] = np.array([[row["loss_d"], row["loss_g"]] for row in result.history])
            runs.append({"run": name, "graph_ran": trainer.use_graph, "graph_fallback_reason":
                         trainer.graph_fallback_reason, "img_per_s_with_a_read_back_per_step":
                         round(result.images_per_sec, 1)})
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


def export(repo: Path, logs: Path, run_id: str | None, env: dict, pictures: Path) -> dict:
    """The registered generator of the run, loaded on the CPU (no CUDA visible), sampled into a grid."""
    if run_id is None:
        raise RuntimeError("no run to export: the train section failed")
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
    trials = table[["trial_id", "status", "cuda_graph", "graph_fallback_reason", "peak_memory_gib"]]
    return {"trials_per_gpu": per_gpu, "wall_s": round(wall, 2), "trials": len(table), "trials_finished": finished,
            "trials_per_hour": round(finished / wall * 3600, 1), "statuses": table["status"].value_counts().to_dict(),
            "errors": [error for error in table.get("error", []) if isinstance(error, str) and error],
            "peak_memory_per_trial_gib": _plain(table["peak_memory_gib"].max()),
            "device_peak_mib": memory.device_peak_mib,
            "per_trial": json.loads(trials.to_json(orient="records"))}  # NaN -> null


def _plain(value):
    return None if pd.isna(value) else float(value)


def default_trials_per_gpu(repo: Path) -> int:
    """What ``sweep.trials_per_gpu: null`` means for the project's one-worker trials."""
    from pipeline.config import load_config

    return round(1 / load_config(repo / "params.yaml").sweep.gpu_share)


# ------------------------------------------------------------------------------------------------ the run


def adjust_for(args, device: torch.device):
    """params.yaml's default, with the smoke test's tiny budget when asked; the same sweep at every trials_per_gpu."""

    def adjust(params: dict) -> None:
        # On a GPU, a GPU or nothing: with auto a machine whose GPU Ray cannot see would train on its CPUs for hours.
        params["ray"]["use_gpu"] = device.type == "cuda"
        # The same 8 trials at every trials_per_gpu, each trained to the end: FIFO, a fixed seed.
        params["sweep"].update(epochs=args.sweep_epochs, scheduler="fifo", search="random", num_workers=1,
                               max_concurrent_trials=max([*(args.trials_per_gpu or []), 8]), seed=0)
        if args.smoke:
            params["model"]["channels"] = 8
            params["evaluator"]["epochs"] = 1
            params["train"].update(epochs=args.smoke_epochs, eval_samples=300, log_every=10)
            params["sweep"].update(num_samples=1, space={"lr_d": [2e-4, 4e-4]})

    return adjust


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a folder with MNIST's four IDX .gz files")
    parser.add_argument("--out", type=Path, default=Path("/tmp/ganpipe-gpu"), help="scratch folder (must not exist)")
    parser.add_argument("--json", type=Path, required=True, help="the JSON to write, outside the repository")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test the script")
    parser.add_argument("--smoke", action="store_true", help="a tiny budget: 2000 images, DCGAN-8, 2 trials")
    parser.add_argument("--smoke-epochs", type=int, default=2, help="the smoke's train epochs")
    parser.add_argument("--engine-epochs", type=int, default=3, help="epochs of the engine alone")
    parser.add_argument("--dp-iterations", type=int, default=200, help="iterations of the data-parallel check")
    parser.add_argument("--trials-per-gpu", type=int, nargs="+",
                        help="sweeps to run (default: 1 and the default trials_per_gpu first, then 8 and 2 if time "
                             "is left; smoke: 1 and the default)")
    parser.add_argument("--sweep-epochs", type=int, default=2)
    parser.add_argument("--sweep-train-images", type=int, default=20_000,
                        help="the sweeps' train split (a third of MNIST, so that the sweeps fit the time)")
    parser.add_argument("--compare", default="none", choices=[*CONDITIONAL, "skip"],
                        help="last, the train stage again with this model.conditional (default none: "
                             "the unconditional GAN beside the default acgan)")
    parser.add_argument("--deadline-s", type=float, help="start no section that could end after this many "
                        "seconds of the run (default 460, the machine's 8 minutes less a margin; smoke: none)")
    parser.add_argument("--started-at", type=float, default=STARTED,
                        help="when the run started (seconds since the epoch): the wrapper's start, unpacking included")
    parser.add_argument("--preflight", type=Path, help="a JSON the wrapper wrote: its section joins the report")
    args = parser.parse_args()
    if args.smoke:
        args.engine_epochs, args.dp_iterations, args.sweep_epochs = 2, 20, 1
    deadline_s = args.deadline_s or (math.inf if args.smoke else 460)
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
    report = Report(args.json.resolve())
    if args.preflight and args.preflight.exists():
        report.section("preflight", json.loads(args.preflight.read_text()).get("preflight"))
    report.section("environment", {**environment(device), "mode": "smoke" if args.smoke else "full",
                                   "command": " ".join(sys.argv[1:])})
    plan = Plan(report, args.started_at, deadline_s, args.smoke)
    env = no_git_shim(out / "bin")
    adjust = adjust_for(args, device)
    train_images = 2000 if args.smoke else MNIST_TRAIN
    repo = scratch_project(out / "project", args.data, train_images, adjust)
    default = default_trials_per_gpu(repo)
    per_gpu = args.trials_per_gpu or [1, default, *([] if args.smoke else [n for n in (8, 2) if n != default])]
    sweep_images = min(train_images, args.sweep_train_images)

    sweep_repo = out / "sweep-project" if sweep_images < train_images else repo  # the train project's, if not cut
    trained: dict = {}

    def sweep_stages() -> dict:
        scratch_project(sweep_repo, args.data, sweep_images, adjust)
        (logs / "sweep").mkdir()
        return {"train_images": sweep_images, **stages(sweep_repo, logs / "sweep", env)}

    # By value: what the GPU run is for first; the rest only while the deadline allows.
    sections = [("stages", lambda: stages(repo, logs, env), None),
                ("train", lambda: trained.update(train(repo, logs, env)) or trained, None),
                ("engine", lambda: engine_alone(repo, device, args.engine_epochs), None)]
    if sweep_images < train_images:
        sections.append(("sweep_stages", sweep_stages, None))
    sections += [(f"sweep_{n}", functools.partial(sweep, sweep_repo, logs, n, env), "sweep") for n in per_gpu[:2]]
    sections += [("dp_graph", lambda: dp_graph(repo, device, args.dp_iterations), None),
                 ("export", lambda: export(repo, logs, trained.get("mlflow_run_id"), env, report.path.parent), None)]
    sections += [(f"sweep_{n}", functools.partial(sweep, sweep_repo, logs, n, env), "sweep") for n in per_gpu[2:]]
    if args.compare != "skip":
        sections.append(("compare_train", lambda: compare_train(repo, logs, env, args.compare, report.path.parent),
                         None))
    rows = []
    for name, make, budget in sections:
        value = plan.run(name, make, budget)
        if name.startswith("sweep_") and name != "sweep_stages":
            rows.append(value)
            report.section("sweep", [row for row in rows if "error" not in row and "skipped" not in row])
    report.section("wall_s", round(time.time() - args.started_at, 1))
    print_table(report.data)
    print(f"\nJSON: {report.path}")


if __name__ == "__main__":
    main()
