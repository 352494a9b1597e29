"""`ganpipe sample` and `ganpipe evaluate`: use a trained generator.

A generator comes from a DVC output (models/<dataset>/generator.pt), a training
checkpoint (models/<dataset>/checkpoint.pt) or an MLflow run (its logged
``generator`` model). Each records how it samples (model settings, noise kind):
it is drawn as training drew it, whatever params.yaml says today.

A class-conditional generator (``model.conditional``) draws the classes it is
asked for: ``--label`` one class, ``--per-class K`` a grid of one row per class,
neither a grid of all classes in turn.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from gan.conditioning import class_rows, conditioning_of
from gan.data import DATASETS
from gan.images import image_grid, save_png
from gan.sampling import RECORD_FORMAT, draw_noise
from gan.metrics import evaluate
from pipeline import tracking
from pipeline.config import Config, ModelConfig
from pipeline.artifacts import evaluator_paths
from pipeline.yardstick import load_reference
from pipeline.modeling import build_generator_and_discriminator, pick_device
from pipeline.spool_records import use_short_http_retries


class SampleError(ValueError):
    """A request the generator cannot serve (e.g. a label for an unconditional model); one line."""


class Sampler:
    """``sampler(n)`` -> n generated samples in the data's range, seeded for reproducibility.

    Noise is drawn as the trainer draws it (``gan.sampling.draw_noise``), of the kind the model trained on.
    A conditional generator (``num_classes`` > 0) takes ``labels=`` (int64, one per sample);
    without them it draws the classes in turn. An unconditional one refuses labels.
    """

    def __init__(self, model: Callable[..., torch.Tensor], latent_dim: int, noise: str, num_classes: int,
                 device: torch.device, seed: int = 0):
        self.model, self.latent_dim, self.noise, self.num_classes = model, latent_dim, noise, num_classes
        self.device = device
        self.noise_source = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def __call__(self, n: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        noise = draw_noise(n, self.latent_dim, self.noise, self.noise_source, self.device)
        if not self.num_classes:
            if labels is not None:
                raise SampleError(UNCONDITIONAL)
            return self.model(noise)
        if labels is None:
            labels = torch.arange(n, device=self.device) % self.num_classes
        return self.model(noise, labels.to(self.device))


UNCONDITIONAL = ("this generator is unconditional (model.conditional: none): it cannot draw a chosen class; "
                 "train with model.conditional acgan, concat or projection (docs/conditional.md)")


def read_generator_file(path: Path, dataset: str, device: torch.device) -> tuple[dict, dict]:
    """(sampling settings, weights) of a generator.pt or a training checkpoint.pt, as training recorded them."""
    retrain = f"`dvc repro train@{dataset}`"
    if not path.is_file():
        raise SampleError(f"no generator at {path} (run {retrain} first)")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # torch raises several kinds for bytes that are not one of its files
        raise SampleError(f"{path}: not a generator.pt or checkpoint.pt that ganpipe wrote (unreadable by torch.load: "
                          "empty, cut short or another kind of file)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # generator.pt: the sampling G
        settings, weights = state, state["state_dict"]
    elif isinstance(state, dict) and isinstance(state.get("trainer"), dict) and "generator" in state["trainer"]:
        settings = state.get("sampling", {})  # a training checkpoint: G's moving average when the run kept one
        weights = state["trainer"].get("g_ema") or state["trainer"]["generator"]
    else:
        raise SampleError(f"{path}: holds a {type(state).__name__}, not a generator.pt or checkpoint.pt that "
                          "ganpipe wrote")
    if settings.get("format") != RECORD_FORMAT:
        raise SampleError(f"{path} was written by an older ganpipe and does not record how it samples "
                          f"(its noise kind): train it again ({retrain})")
    return settings, weights


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def load_sampler(cfg: Config, dataset: str, *, checkpoint: str | None, mlflow_run: str | None,
                 device: torch.device, seed: int = 0) -> Sampler:
    """The generator of a DVC output, a checkpoint or an MLflow run, as a ``Sampler`` that draws as training did.

    What it samples with (model size, noise kind, conditioning) comes from the file or the run, never from today's
    params.yaml.
    """
    classes = len(DATASETS[dataset].classes)
    if mlflow_run:
        model, params = _logged_generator(cfg, mlflow_run, device)
        latent_dim, noise = int(params["model.latent_dim"]), params["train.noise"]
        classes = classes if params["model.conditional"] != "none" else 0  # the run's record: older models say none
    else:
        path = Path(checkpoint or Path("models") / dataset / "generator.pt")
        settings, weights = read_generator_file(path, dataset, device)
        model_cfg = ModelConfig(**settings["model"])
        model, _ = build_generator_and_discriminator(model_cfg, dataset)
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            raise SampleError(f"{path}: its weights do not fit the model it records "
                              f"({_first_line(err).removeprefix('Error(s) in loading state_dict for ')})") from None
        model.to(device).eval()
        latent_dim, noise, classes = model_cfg.latent_dim, settings["noise"], conditioning_of(model).classes
    return Sampler(model, latent_dim, noise, classes, device, seed)


def _logged_generator(cfg: Config, run_id: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The generator an MLflow run logged, and the run's params; a dead server or a wrong id is one line."""
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    uri = tracking.tracking_uri(cfg, Path.cwd())
    store = Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("sqlite:///") and not store.is_file():  # MLflow would create an empty one
        raise SampleError(f"--mlflow-run {run_id}: no MLflow store at {store} (set mlflow.tracking_uri to the "
                          "store or server that holds the run)")
    problem = tracking.probe_tracking_server(uri, tracking.tracking_credentials())
    if problem:
        raise SampleError(f"--mlflow-run: MLflow at {uri} {problem}")
    use_short_http_retries()
    mlflow.set_tracking_uri(uri)
    try:
        params = mlflow.get_run(run_id).data.params  # the run's own settings
        return mlflow.pytorch.load_model(f"runs:/{run_id}/generator", device=device), params
    except MlflowException as err:
        raise SampleError(f"--mlflow-run {run_id}: no run with a logged generator in {uri} "
                          f"({_first_line(err)})") from None


def class_index(dataset: str, label: str) -> int:
    """--label as a class index: a number, or one of the dataset's class names (e.g. Sneaker)."""
    names = DATASETS[dataset].classes
    index = int(label) if label.isdigit() else next((i for i, name in enumerate(names) if name == label), -1)
    if not 0 <= index < len(names):
        raise SampleError(f"--label {label!r} is not a class of {dataset} (allowed: 0-{len(names) - 1} or "
                          f"{', '.join(names)})")
    return index


def sample_command(cfg: Config, dataset: str, *, checkpoint: str | None, mlflow_run: str | None,
                   n: int, output: str, seed: int, label: str | None = None, per_class: int | None = None) -> Path:
    if Path(output).suffix.lower() != ".png":
        raise SampleError(f"-o {output}: name a .png file (e.g. -o {Path(output).with_suffix('.png').name})")
    sampler = load_sampler(cfg, dataset, checkpoint=checkpoint, mlflow_run=mlflow_run,
                           device=pick_device(cfg.ray.use_gpu), seed=seed)
    nrow, labels, what = max(1, round(n ** 0.5)), None, f"{n} samples of {dataset}"
    if per_class is not None and per_class < 1:
        raise SampleError(f"--per-class {per_class}: needs at least 1 sample per class")
    if (label is not None or per_class) and not sampler.num_classes:
        option = "--label" if label is not None else "--per-class"
        raise SampleError(f"{option}: {UNCONDITIONAL}")
    if label is not None:
        index = class_index(dataset, label)
        labels, what = torch.full((n,), index), f"{n} samples of {dataset} class {label}"
    elif per_class:
        labels, nrow = class_rows(sampler.num_classes, per_class), per_class
        n, what = len(labels), f"{per_class} samples per class of {dataset}, one row per class"
    grid = image_grid(sampler(n, labels=labels), nrow=nrow)
    partial = Path(output).with_name(f".{Path(output).name}.partial.png")  # renamed when whole
    try:
        save_png(grid, partial)
        partial.replace(output)
    except OSError as err:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise SampleError(f"-o {output}: cannot write there ({err.strerror or err})") from None
    print(f"wrote {what} to {output}")
    return Path(output)


def evaluate_command(cfg: Config, dataset: str, *, checkpoint: str | None, mlflow_run: str | None,
                     n: int, seed: int) -> pd.DataFrame:
    if DATASETS[dataset].kind == "toy":
        raise SampleError("ganpipe evaluate measures image datasets; gaussian1d runs report mean/std in training")
    device = pick_device(cfg.ray.use_gpu)
    sampler = load_sampler(cfg, dataset, checkpoint=checkpoint, mlflow_run=mlflow_run, device=device, seed=seed)
    evaluator, reference = load_reference(dataset, Path("."), device)
    scores = evaluate(sampler, evaluator, reference, n=n, device=device, conditional=sampler.num_classes > 0)
    floors = json.loads(evaluator_paths(dataset)["yardstick"].read_text())
    table = pd.DataFrame({"model": scores, "floor (real vs real)": floors["real_vs_real"],
                          "noise ceiling": floors["noise"]}).loc[list(scores)]
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    return table


