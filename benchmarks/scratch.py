"""A scratch project for benchmarks that run the real pipeline: a git + DVC repository on a real-data mirror.

The mirror holds the first ``train_images`` real training images and the full
real test split, so the pipeline's own fetch, preprocess and evaluator stages run
on it unchanged.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gan.data import load_idx_split  # noqa: E402
from real_mnist import idx_gz  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def subset_mirror(data: Path, mirror: Path, train_images: int) -> None:
    """The real IDX files, the train split cut to its first ``train_images`` images."""
    mirror.mkdir(parents=True)
    for split, (images_name, labels_name) in FILES.items():
        images, labels = load_idx_split(data / images_name, data / labels_name)
        if split == "train":
            images, labels = images[:train_images], labels[:train_images]
        (mirror / images_name).write_bytes(idx_gz(images))
        (mirror / labels_name).write_bytes(idx_gz(labels))


def project_params(mirror: Path, dataset: str = "mnist") -> dict:
    """The project's params.yaml reading ``dataset`` from the mirror (its md5s are not the published ones)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(datasets=[dataset], mirrors={dataset: [str(mirror)]}, verify_checksums=False)
    return params


def scratch_repo(repo: Path, params: dict) -> Path:
    """A git + DVC repository holding the project's pipeline and ``params``, committed."""
    repo.mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", repo)
    for package in ("gan", "pipeline", "presets"):  # dvc.yaml tracks these as deps
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("mlruns/\nray_results/\n.ganpipe/\n")
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=ganpipe", "-c", "user.email=ganpipe@localhost", "commit", "-qm", "scratch"]):
        run(command, repo, quiet=True)
    return repo


def run(args: list[str], cwd: Path, quiet: bool = False) -> float:
    """Run a command with the venv's tools on PATH; returns its wall seconds."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the repository's own SQLite store
    started = time.perf_counter()
    subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=quiet)
    seconds = time.perf_counter() - started
    if not quiet:
        print(f"{' '.join(args)}: {seconds:.1f} s", flush=True)
    return seconds
