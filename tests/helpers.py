"""What the tests share besides fixtures (those live in conftest.py): synthetic data, a loopback mirror,
repositories with the real tools, processes.

Nothing here needs the internet or data outside the repository.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import http.server
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
import yaml

from gan.data import DeviceBatches, to_unit_range
from gan.engine import EngineConfig, GANTrainer
from gan.models import build_models


REPO_ROOT = Path(__file__).resolve().parents[1]


VENV_BIN = Path(sys.executable).parent


NUM_CLASSES = 10


def class_patterns(size: int = 28) -> np.ndarray:
    """Ten distinct uint8 patterns: a bright 8x8 block at a class-specific place."""
    patterns = np.zeros((NUM_CLASSES, size, size), np.uint8)
    for c in range(NUM_CLASSES):
        row, col = 2 + (c // 5) * 14, 1 + (c % 5) * 5
        patterns[c, row:row + 10, col:col + 6] = 255
    return patterns


def synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images of the class patterns with a little noise; labels cycle through classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % NUM_CLASSES
    rng.shuffle(labels)
    noise = rng.integers(0, 40, size=(n, 28, 28))
    images = np.clip(class_patterns()[labels].astype(np.int64) - noise + noise[:, ::-1], 0, 255)
    return images.astype(np.uint8), labels


def idx_bytes(array: np.ndarray) -> bytes:
    """An uncompressed IDX file: magic 0x0000 08 <ndim>, big-endian dims, uint8 data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def synthetic_idx_files(n_train: int = 300, n_test: int = 100) -> dict[str, bytes]:
    """The four standard gz files of a small synthetic dataset."""
    x_train, y_train = synthetic_split(n_train, seed=1)
    x_test, y_test = synthetic_split(n_test, seed=2)
    files = {
        "train-images-idx3-ubyte.gz": x_train, "train-labels-idx1-ubyte.gz": y_train,
        "t10k-images-idx3-ubyte.gz": x_test, "t10k-labels-idx1-ubyte.gz": y_test,
    }
    return {name: gzip.compress(idx_bytes(arr), mtime=0) for name, arr in files.items()}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@dataclass
class Mirror:
    """A loopback HTTP server for a dict of files, with scripted misbehaviour."""

    files: dict[str, bytes]
    url: str = ""
    # name -> status codes to answer (in order) before serving the file
    fail_first: dict[str, list[int]] = field(default_factory=dict)
    # names whose body is cut in half while Content-Length promises all of it
    truncate: set[str] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)


@contextmanager
def serve_mirror():
    """Serve synthetic IDX files over loopback HTTP for the duration of the block."""
    state = Mirror(files=synthetic_idx_files())

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            name = self.path.lstrip("/")
            state.requests.append(name)
            queued = state.fail_first.get(name)
            if queued:
                self.send_error(queued.pop(0))
                return
            if name not in state.files:
                self.send_error(404)
                return
            body = state.files[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if name in state.truncate else body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_port}/"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def tool_env() -> dict[str, str]:
    """The environment for project commands: the venv's tools first, the repo's own MLflow store."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
           "DVC_NO_ANALYTICS": "1"}
    # mlflow.set_tracking_uri() / set_registry_uri() in a test process export these: a stage must use its own store
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_REGISTRY_URI", None)
    return env


def repo_mlflow_client(repo: Path):
    """A client for the repo's own MLflow store, for its runs and its registry alike.

    It sets mlflow's process-wide URIs too, for ``models:/`` look-ups; ``mlflow_uris_reset`` undoes that.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, registry_uri=uri)


def run_cmd(args: list[str], cwd: Path, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n"
                             f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}")
    return result


def make_dvc_repo(path: Path, params: dict) -> Path:
    """A git + DVC repository holding the project's pipeline with the given params."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "dvc.yaml", path / "dvc.yaml")
    for package in ("gan", "pipeline", "presets"):  # dvc.yaml tracks these sources as deps
        shutil.copytree(REPO_ROOT / package, path / package, ignore=shutil.ignore_patterns("__pycache__"))
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (path / ".gitignore").write_text("mlruns/\nray_results/\n")
    run_cmd(["git", "init", "-q", "-b", "main"], path)
    run_cmd(["dvc", "init", "-q"], path)
    run_cmd(["git", "add", "-A"], path)
    run_cmd(["git", "commit", "-qm", "fixture"], path)
    return path


FIXTURE_EVALUATOR = {"epochs": 5, "batch_size": 32}  # every copied repository's evaluator


UNUSED_MIRROR = "http://unused/"  # for params of a copied repository, whose data section is the template's


def copy_repo(template: Path, folder: Path, params: dict | None = None) -> Path:
    """A copy of ``template`` under ``folder``; with ``params``, less their data and evaluator sections (those stay
    the template's, so DVC finds the stages up to the evaluator up to date), committed."""
    repo = Path(shutil.copytree(template, folder / "repo", symlinks=True))
    if params is not None:
        kept = yaml.safe_load((template / "params.yaml").read_text())
        params = {**params, "data": kept["data"], "evaluator": kept["evaluator"]}
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run_cmd(["git", "commit", "-qam", "params"], repo)
    return repo


def image_steps(client, run_id: str) -> list[int]:
    """The steps of a run's per-epoch sample grids, from their MLflow file names (<key>+step+<step>+...)."""
    names = [item.path.rsplit("/", 1)[1] for item in client.list_artifacts(run_id, "images")]
    return sorted(int(name.split("+step+")[1].split("+")[0]) for name in names if name.endswith(".png"))


def write_params(repo: Path, name: str, **sections) -> str:
    """A params file beside the repo's params.yaml, with sections merged over it (for `ganpipe --params NAME`)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in sections.items():
        params[section] = {**params.get(section, {}), **values}
    (repo / name).write_text(yaml.safe_dump(params, sort_keys=False))
    return name


def project_params(**section_overrides) -> dict:
    """The project's params.yaml with sections merged over, for fixture repos."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for section, values in section_overrides.items():
        params[section] = {**params.get(section, {}), **values}
    return params


def sweep_params(mirror_url: str) -> dict:
    """A 4-trial ASHA sweep on the fixture, one trial forced to diverge, plus a short train run."""
    params = project_params(
        data={"datasets": ["mnist"], "mirrors": {"mnist": [mirror_url]}, "verify_checksums": False},
        # Plain SGD trials, no spectral norm or G-EMA: their FIDs spread enough for ASHA to stop one.
        model={"name": "mlp", "hidden": [32, 64], "latent_dim": 16, "spectral_norm": False},
        train={"epochs": 2, "batch_size": 64, "optimizer": "sgd", "eval_samples": 200, "log_every": 2, "g_ema": 0.0},
        evaluator=FIXTURE_EVALUATOR,
        ray={"use_gpu": False, "num_workers": 1},
    )
    params["sweep"] = {
        **params["sweep"],
        "dataset": "mnist",
        "space": {"lr_d": [0.01, 0.02, 0.05, HUGE_LR], "lr_g": {"loguniform": [0.005, 0.05]},
                  "d_steps": {"choice": [1, 2]}, "g_steps": {"choice": [1, 2]}},
        "num_samples": 1, "scheduler": "asha", "metric": "fid", "epochs": 3, "grace_period": 1,
        "reduction_factor": 2, "num_workers": 1, "max_concurrent_trials": 1, "seed": 0,
    }
    return params


HUGE_LR = 1.0e30  # SGD at this rate overflows within a few steps: that trial must diverge


def end_process_tree(process: subprocess.Popen) -> None:
    """SIGTERM the process, then SIGKILL it and every descendant it had, each by its pid."""
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


BAR = "%|"  # tqdm's "100%|███|": a progress bar was drawn


def on_a_terminal(args: list[str], cwd: Path, timeout: float = 600) -> str:
    """Run a command with stdout and stderr on a pseudo-terminal; everything it drew."""
    controller, terminal = pty.openpty()
    # 50 rows x 160 columns: a terminal of size 0 x 0 gives tqdm no room to draw
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    process = subprocess.Popen(args, cwd=cwd, env=tool_env(), stdin=subprocess.DEVNULL,
                               stdout=terminal, stderr=terminal, start_new_session=True)
    os.close(terminal)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if ready:
                try:
                    chunks.append(os.read(controller, 65536))
                except OSError:  # every writer closed the terminal
                    break
            elif process.poll() is not None:  # exited; Ray's daemons may still hold the terminal open
                break
            assert time.monotonic() < deadline, f"{args} did not finish in {timeout} s"
        process.wait(timeout=60)
    finally:
        end_process_tree(process)  # and what it started, also when the deadline passed
        os.close(controller)
    output = b"".join(chunks).decode(errors="replace")
    assert process.returncode == 0, output[-3000:]
    return output


def wait_until(condition, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process is None or process.poll() is None, f"{what}: the process ended (rc {process.returncode})"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def read_until(process: subprocess.Popen, pattern: str, seen: list[str]) -> re.Match:
    """Read the process's output (``seen`` keeps it) until a line matches ``pattern``."""
    for line in process.stdout:
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"the output ended without {pattern!r}:\n" + "".join(seen)[-4000:])


# What Ray and MLflow processes look like on a command line (Ray's own processes and workers, MLflow servers).
TOOL_PROCESS = re.compile(r"raylet|gcs_server|ray::|ray/_private|ray/dashboard|ray/autoscaler|\bray start|mlflow")


SESSION_MARK = "GANPIPE_TEST_SESSION"  # inherited by every process the suite starts, Ray's daemons included


def started_by(process: psutil.Process, session: str) -> bool:
    """Whether the process carries this suite's mark in its environment (Ray and MLflow of other users do not)."""
    try:
        return process.environ().get(SESSION_MARK) == session
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def shipped_params() -> dict:
    """The project's params.yaml as shipped: the one owner of the defaults."""
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def engine_config(**overrides) -> EngineConfig:
    """The engine's knobs as params.yaml ships them, with ``overrides``."""
    return EngineConfig.from_mapping({**shipped_params()["train"], **overrides})


def random_image_batches(n: int, size: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """n batches of random 28x28 images in the generators' range."""
    pixels = torch.randint(0, 256, (n * size, 1, 28, 28), generator=torch.Generator().manual_seed(seed),
                           dtype=torch.uint8)
    return list(to_unit_range(pixels).split(size))


def small_generator_record(**model) -> dict:
    """A generator record as training writes it, of a small unconditional MLP with ``model`` set over the shipped
    model section."""
    from gan.sampling import RECORD_FORMAT
    from pipeline.config import ModelConfig
    from pipeline.modeling import build_generator_and_discriminator

    settings = ModelConfig(**{**shipped_params()["model"], "name": "mlp", "hidden": [16], "latent_dim": 8,
                              "conditional": "none", **model})
    generator, _ = build_generator_and_discriminator(settings, "mnist")
    return {"format": RECORD_FORMAT, "state_dict": generator.state_dict(), "model": settings.model_dump(),
            "noise": "gaussian", "dataset": "mnist"}


# ---------------------------------------------------------------- small class-conditional models and data

IMAGE = (1, 28, 28)
SMALL_CONDITIONAL = dict(latent_dim=16, hidden=(32, 64), channels=8, label_embedding=64)
CLASSES = 10


def conditional_models(model: str = "dcgan", conditional: str = "projection", **kwargs):
    torch.manual_seed(0)
    return build_models(model, IMAGE, conditional=conditional, num_classes=CLASSES, **{**SMALL_CONDITIONAL, **kwargs})


def make_trainer(model: str = "dcgan", conditional: str = "projection", seed: int = 0, **config) -> GANTrainer:
    generator, discriminator = conditional_models(model, conditional)
    return GANTrainer(generator, discriminator, engine_config(**config), device="cpu", seed=seed)


def labelled_data(n: int = 128, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = synthetic_split(n, seed=seed)
    return torch.from_numpy(images), torch.from_numpy(labels)


def labelled_batches(n: int = 128, batch_size: int = 16, seed: int = 3) -> DeviceBatches:
    images, labels = labelled_data(n, seed)
    return DeviceBatches(images, batch_size, seed=seed, labels=labels)
