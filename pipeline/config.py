"""params.yaml -> typed, validated config: the one place that knows the schema.

Every stage calls ``load_config()``. A bad value stops with one line that names
the key, the value and what is allowed; unknown keys are errors.

The shipped params.yaml is the one owner of the defaults: the schema below gives
no key a default, so every key must be in the file, and a file that leaves one out
is refused with one line naming it. A default in the schema would be a second copy
that drifts from the file DVC tracks and users read (it did: a params file missing
a key silently trained another model). Presets stay deltas over params.yaml.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from gan.data import DATASETS
from pipeline.presets import ParamsFileError, apply_overrides, apply_preset, read_mapping

PARAMS_FILE = "params.yaml"

# The names of gan's registries, spelled here so that reading params.yaml does not import the models (each
# stage's dvc.yaml deps stay the code it runs); tests/test_config.py keeps them equal to the registries.
DatasetName = Literal["mnist", "fashion_mnist", "gaussian1d"]
ModelName = Literal["mlp", "dcgan", "dcgan_upsample", "toy1d"]
LossName = Literal["minimax", "ns", "wgan", "wgan_gp", "hinge"]
PositiveFloat = Field(gt=0)


class ConfigError(ValueError):
    """An invalid params.yaml; the message is one line naming key, value and what is allowed."""


class Section(BaseModel):
    # A number is finite wherever one is expected; "1e-3" read as a string is taken as the float it spells.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataConfig(Section):
    datasets: list[DatasetName] = Field(min_length=1)
    verify_checksums: bool
    retries: int = Field(ge=1)
    timeout_s: float = Field(gt=0)
    mirrors: dict[DatasetName, list[str]]
    train_images: Optional[PositiveInt]  # the first N training images only (a quick run); null: all

    @field_validator("datasets")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each dataset may appear once")
        return value

    @model_validator(mode="after")
    def _listed_datasets_have_mirrors(self) -> "DataConfig":
        for dataset in self.datasets:
            if DATASETS[dataset].kind != "toy" and not self.mirrors.get(dataset):
                raise ValueError(f"missing key 'data.mirrors.{dataset}': data.datasets lists {dataset}, so it needs "
                                 "a list of mirrors (URLs or folders) to fetch it from")
        return self


class ModelConfig(Section):
    name: ModelName
    latent_dim: PositiveInt
    hidden: list[PositiveInt] = Field(min_length=1)
    channels: PositiveInt
    dropout: float = Field(ge=0, lt=1)
    activation: Literal["leaky_relu", "relu", "tanh"]  # mlp / toy1d hidden layers
    spectral_norm: bool
    conditional: Literal["none", "concat", "projection", "acgan", "tacgan"]  # class-conditional (gan.conditioning)
    label_embedding: PositiveInt  # width of G's label embedding, which joins z (conditional models)


class TrainConfig(Section):
    epochs: PositiveInt
    batch_size: PositiveInt
    # split: batch_size is the global batch, divided among the Ray workers (the same steps per epoch at any
    # worker count); per_worker: each worker trains at batch_size, so adding workers adds images per second.
    batch_scaling: Literal["split", "per_worker"]
    loss: LossName
    label_smoothing: float = Field(ge=0, lt=1)
    noise: Literal["gaussian", "uniform"]
    optimizer: Literal["auto", "adam", "rmsprop", "sgd"]
    lr_g: float = PositiveFloat
    lr_d: float = PositiveFloat
    betas_g: tuple[float, float]
    betas_d: tuple[float, float]
    d_steps: PositiveInt
    g_steps: PositiveInt
    clip_value: float = Field(gt=0)
    gp_weight: float = Field(ge=0)
    class_weight: float = Field(ge=0)  # acgan, tacgan: weight of D's class head in both losses
    lr_decay_gamma: float = Field(gt=0, le=1)
    lr_decay_every: PositiveInt
    d_pretrain_steps: int = Field(ge=0)
    early_stop_patience: int = Field(ge=0)
    early_stop_tol: float = Field(gt=0, lt=0.5)
    log_every: PositiveInt
    bf16: bool
    cuda_graph: bool
    g_ema: float = Field(ge=0, lt=1)
    checkpoint_every: PositiveInt
    eval_samples: PositiveInt
    seed: int

    def worker_batch(self, workers: int) -> int:
        """Each Ray worker's batch: batch_size split among ``workers``, or all of it (``per_worker``)."""
        return self.batch_size if self.batch_scaling == "per_worker" else self.batch_size // workers

    @field_validator("betas_g", "betas_d")
    @classmethod
    def _betas_in_unit_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError("both betas must be in [0, 1)")
        return value


class EvaluatorConfig(Section):
    epochs: PositiveInt
    batch_size: PositiveInt
    lr: float = Field(gt=0)
    seed: int


class RayConfig(Section):
    address: Optional[str]
    # auto: one worker per GPU the cluster holds (at most max_workers), one worker on CPUs (the fastest measured)
    num_workers: Union[PositiveInt, Literal["auto"]]
    max_workers: Optional[PositiveInt]  # caps num_workers: auto; null: no cap
    use_gpu: Literal["auto", True, False]
    storage_path: str
    max_failures: int = Field(ge=-1)
    autoscale: bool  # the cluster grows on demand: wait for resources instead of failing fast


TRACKING_URI = re.compile(r"^(databricks\b|(https?|sqlite|file|postgresql|mysql|mssql)(\+\w+)?:)")


class MlflowConfig(Section):
    tracking_uri: Optional[str]

    @field_validator("tracking_uri")
    @classmethod
    def _uri_has_a_scheme(cls, uri: str | None) -> str | None:
        # "localhost:5000" parses as scheme "localhost": MLflow would fail much later, far from the cause.
        if uri is not None and not TRACKING_URI.match(uri):
            raise ValueError("expected a URI with a scheme: http(s)://host:port for a server, sqlite:///path, "
                             "file:///path, or null for the project's own store")
        return uri
    experiment_prefix: str
    register_model: bool
    # At a stage's end, how long to keep retrying what an outage left in the spool before exiting anyway.
    flush_timeout_s: float = Field(ge=0)


# Quality metrics a sweep can optimize, and whether lower or higher is better.
METRIC_MODES = {"fid": "min", "kid": "min", "class_kl": "min", "inception_score": "max",
                "class_coverage": "max", "precision": "max", "recall": "max", "density": "max", "coverage": "max",
                "cond_accuracy": "max", "precision_within_class": "max", "recall_within_class": "max",
                "density_within_class": "max", "coverage_within_class": "max",
                "wasserstein": "min"}  # wasserstein: the 1-D toy set's only quality metric
CONDITIONAL_METRICS = ("cond_accuracy", "precision_within_class", "recall_within_class", "density_within_class",
                       "coverage_within_class")  # only a conditional model reports them
# One-worker sweep trials per GPU when sweep.trials_per_gpu is null (docs/gpu.md says why 4).
DEFAULT_TRIALS_PER_GPU = 4
SweepableKey = Literal["lr_g", "lr_d", "d_steps", "g_steps", "loss", "label_smoothing", "batch_size", "conditional"]
MODEL_SWEEP_KEYS = ("conditional",)  # swept keys of the model section; the others are train.<key>


def sweep_param(key: str) -> str:
    """The params.yaml path a sweep dimension sets: model.conditional, train.lr_g, ..."""
    return f"{'model' if key in MODEL_SWEEP_KEYS else 'train'}.{key}"
DISTRIBUTIONS = ("choice", "loguniform", "uniform")
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class SweepConfig(Section):
    dataset: Optional[DatasetName]  # null: the first of data.datasets (Config.sweep_dataset)
    # Each entry: a list (every value, a grid) or one of {choice: [...]},
    # {loguniform: [low, high]}, {uniform: [low, high]}.
    space: dict[SweepableKey, Any] = Field(min_length=1)
    num_samples: PositiveInt
    scheduler: Literal["asha", "fifo", "pbt"]
    search: Literal["random", "optuna"]
    startup_trials: PositiveInt  # optuna: random trials before TPE models the results
    metric: Literal[tuple(METRIC_MODES)]
    epochs: PositiveInt
    grace_period: PositiveInt
    reduction_factor: float = Field(gt=1)
    perturbation_interval: PositiveInt
    num_workers: PositiveInt
    # One-worker trials sharing a GPU (each asks Ray for 1/N of one); null: DEFAULT_TRIALS_PER_GPU, and 1
    # for data-parallel trials, which hold a whole GPU per worker.
    trials_per_gpu: Optional[PositiveInt]
    max_concurrent_trials: PositiveInt
    seed: int

    @field_validator("space", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, space: Any) -> Any:
        """Spelled numbers (a quoted "1e-3") become floats, as they do in the typed sections."""
        def number(value: Any) -> Any:
            if isinstance(value, list):
                return [number(v) for v in value]
            if isinstance(value, dict):
                return {k: number(v) for k, v in value.items()}
            if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
                return float(value)
            return value
        return number(space)

    @model_validator(mode="after")
    def _search_fits_scheduler(self) -> "SweepConfig":
        if self.search == "optuna" and self.scheduler == "pbt":
            raise ValueError("search = 'optuna' needs scheduler asha or fifo (pbt explores by itself)")
        return self

    @model_validator(mode="after")
    def _shared_gpus_hold_one_worker(self) -> "SweepConfig":
        if self.num_workers > 1 and (self.trials_per_gpu or 1) > 1:
            raise ValueError(f"sweep.trials_per_gpu = {self.trials_per_gpu} cannot go with sweep.num_workers = "
                             f"{self.num_workers}: a data-parallel trial holds a whole GPU per worker (NCCL cannot "
                             "share one between ranks); set sweep.trials_per_gpu: 1 or sweep.num_workers: 1")
        return self

    @property
    def gpu_share(self) -> float:
        """The fraction of a GPU one trial asks for (a PBT trial trains in one process, whatever num_workers)."""
        if self.num_workers > 1 and self.scheduler != "pbt":
            return 1.0
        return 1 / (self.trials_per_gpu or DEFAULT_TRIALS_PER_GPU)

    @property
    def mode(self) -> str:
        return METRIC_MODES[self.metric]

    def candidate_values(self) -> dict[str, list]:
        """Every concrete value (or bound) the space can produce, per key; raises if one cannot be sampled."""
        out = {}
        for key, spec in self.space.items():
            where = f"sweep.space.{key}"
            if isinstance(spec, list):
                if not spec:
                    raise ValueError(f"{where}: an empty list cannot be sampled")
                out[key] = spec
                continue
            if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
                raise ValueError(f"{where}: expected a list or one of {{{', '.join(DISTRIBUTIONS)}: ...}}, "
                                 f"got {spec!r}")
            kind, args = next(iter(spec.items()))
            if kind == "choice" and not (isinstance(args, list) and args):
                raise ValueError(f"{where}.choice: needs a non-empty list, got {args!r}")
            bounds = isinstance(args, list) and len(args) == 2 and all(
                isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args)
            if kind != "choice" and not (bounds and args[0] < args[1] and (kind != "loguniform" or args[0] > 0)):
                positive = ", 0 < low" if kind == "loguniform" else ""
                raise ValueError(f"{where}.{kind}: needs [low, high] of finite numbers, low < high{positive}; "
                                 f"got {args!r}")
            out[key] = args
        return out


class Config(Section):
    preset: Optional[str]  # applied by load_config; kept here to be logged with the run
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    evaluator: EvaluatorConfig
    ray: RayConfig
    mlflow: MlflowConfig
    sweep: SweepConfig

    @property
    def sweep_dataset(self) -> str:
        """The dataset the sweep trains on: sweep.dataset, or the first of data.datasets when it is null."""
        return self.sweep.dataset or self.data.datasets[0]

    @model_validator(mode="after")
    def _model_fits_data(self) -> "Config":
        toy = [d for d in self.data.datasets if d == "gaussian1d"]
        if self.model.name == "toy1d" and len(toy) != len(self.data.datasets):
            raise ValueError("model.name toy1d only trains the gaussian1d dataset")
        swept = "conditional" in self.sweep.space
        trials = self.sweep.candidate_values()["conditional"] if swept else [self.model.conditional]
        conditional = sorted({self.model.conditional, *trials} - {"none"})
        if conditional and (self.model.name == "toy1d" or toy):
            raise ValueError(f"model.conditional {conditional[0]} needs class labels: toy1d and gaussian1d "
                             "have none (allowed there: none)")
        if (self.sweep_dataset == "gaussian1d") != (self.sweep.metric == "wasserstein"):
            allowed = "wasserstein" if self.sweep_dataset == "gaussian1d" else "any but wasserstein"
            raise ValueError(f"sweep.metric {self.sweep.metric} is not measured on {self.sweep_dataset}, the sweep's "
                             f"dataset (allowed there: {allowed})")
        if self.sweep.metric in CONDITIONAL_METRICS and "none" in trials:
            raise ValueError(f"sweep.metric {self.sweep.metric} needs a conditional model in every trial "
                             "(model.conditional or sweep.space.conditional: concat, projection, acgan, tacgan)")
        return self

    @model_validator(mode="after")
    def _sweep_values_are_valid_train_values(self) -> "Config":
        for key, values in self.sweep.candidate_values().items():
            section = ModelConfig if key in MODEL_SWEEP_KEYS else TrainConfig
            base = (self.model if key in MODEL_SWEEP_KEYS else self.train).model_dump()
            for value in values:
                try:
                    section.model_validate({**base, key: value})
                except ValidationError as err:
                    reason = err.errors()[0]["msg"].removeprefix("Value error, ")
                    raise ValueError(f"sweep.space.{key}: {value!r} is not a valid {sweep_param(key)}: "
                                     f"{reason}") from None
        return self


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(part) for part in first["loc"] if part != "[key]") or "<top level>"
    if first["type"] == "extra_forbidden":
        section = _section_model(first["loc"][:-1])
        allowed = ", ".join(section.model_fields) if section else "?"
        return f"{source}: unknown key '{loc}' (allowed here: {allowed})"
    if first["type"] == "missing":
        return f"{source}: missing key '{loc}' (every key must be set: the shipped params.yaml lists them all)"
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    if loc == "<top level>":
        return f"{source}: {msg}"
    if isinstance(value, dict):
        return f"{source}: {loc}: {msg}"
    return f"{source}: {loc} = {value!r} is invalid: {msg}"


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def validate(raw: dict[str, Any], source: str = PARAMS_FILE) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found (run from the project root, where params.yaml lives)")
    try:
        return read_mapping(path)
    except ParamsFileError as err:
        raise ConfigError(str(err)) from None


def load_config(path: str | Path = PARAMS_FILE, overrides: dict[str, Any] | None = None) -> Config:
    """params.yaml with ``overrides`` set, then its ``preset`` (if any) applied, validated."""
    raw = apply_overrides(read_params(path), overrides or {})
    try:
        raw = apply_preset(raw, Path(path).resolve().parent)
    except ParamsFileError as err:
        raise ConfigError(f"{path}: {err}") from None
    return validate(raw, source=str(path))


def flatten(cfg: Config) -> dict[str, Any]:
    """{"train.lr_g": 0.0002, ...}: the flat view MLflow params and sweeps use."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = node

    walk("", cfg.model_dump(mode="json"))
    return flat


def params_hash(path: str | Path = PARAMS_FILE) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
