"""The GAN training loop: D:G ratios, optimizers, LR decay, metrics, G-EMA, early stop.

The CUDA graph of an iteration lives in ``gan.graph``; state and checkpoints in ``gan.checkpoint``;
noise and sampling in ``gan.sampling``.

One *iteration* (``GANTrainer.step`` counts them) is ``d_steps`` discriminator
updates followed by ``g_steps`` generator updates. Each D update consumes one
real batch from the iterator, so with ``d_steps=5`` an iteration eats five
batches. G updates consume no new data: D scores their fakes next to the
iteration's last real batch, so that its BatchNorm statistics are the same
mixture of real and fake as in D's own update (see ``_g_update``).
Every update draws fresh noise from the trainer's own ``torch.Generator``, which
is what makes a resumed run bit-identical to an uninterrupted one.

Nothing reads back to the host per step: metrics accumulate as device tensors
and are read (and checked for NaN/inf) every ``log_every`` iterations.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from gan.checkpoint import TrainerState
from gan.conditioning import class_rows, conditioning_of, label_args, split_batch, split_batches
from gan.graph import CapturedIteration
from gan.losses import LOSSES, clip_weights, interpolate, penalty_at
from gan.sampling import Sampling

# The order of the metrics tensor that every iteration produces: D's five, then G's two.
D_METRICS = ("loss_d", "d_real", "d_fake", "d_acc", "grad_norm_d")
G_METRICS = ("loss_g", "grad_norm_g")
METRICS = D_METRICS + G_METRICS

NOISE_KINDS = ("gaussian", "uniform")
OPTIMIZERS = ("auto", "adam", "rmsprop", "sgd")
FIXED_NOISE_SIZE = 64  # the sample grid: 8 x 8
FIXED_PER_CLASS = 8  # a conditional model's sample grid: one row of 8 per class


@dataclass
class EngineConfig:
    """The training knobs of params.yaml's ``train:`` section, under the same names.

    No defaults: the values come from params.yaml (``from_mapping``), which owns them.
    """

    loss: str
    label_smoothing: float
    noise: str
    optimizer: str
    lr_g: float
    lr_d: float
    betas_g: tuple[float, float]
    betas_d: tuple[float, float]
    d_steps: int
    g_steps: int
    clip_value: float
    gp_weight: float
    class_weight: float  # acgan, tacgan: weight of the class head's cross-entropy in D's and G's losses
    lr_decay_gamma: float
    lr_decay_every: int
    d_pretrain_steps: int
    early_stop_patience: int
    early_stop_tol: float
    log_every: int
    bf16: bool
    cuda_graph: bool
    g_ema: float  # decay of the moving average of G's weights that samples (0: off)

    def __post_init__(self):
        for name, value, allowed in (("loss", self.loss, tuple(LOSSES)), ("noise", self.noise, NOISE_KINDS),
                                     ("optimizer", self.optimizer, OPTIMIZERS)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        for name in ("d_steps", "g_steps", "lr_decay_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.g_ema < 1:
            raise ValueError(f"g_ema must be in [0, 1), got {self.g_ema}")
        self.betas_g, self.betas_d = tuple(self.betas_g), tuple(self.betas_d)

    @classmethod
    def from_mapping(cls, section: dict) -> "EngineConfig":
        """The config from a params ``train:`` section; keys that are not engine knobs are skipped, a missing one
        raises."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in section.items() if key in names})


class DivergedError(RuntimeError):
    """A loss or metric went NaN/inf. ``step`` is the iteration of the read-back that saw it."""

    def __init__(self, step: int, last_metrics: dict[str, float], lr_d: float, lr_g: float):
        bad = ", ".join(f"{k}={v}" for k, v in last_metrics.items() if not math.isfinite(v))
        super().__init__(
            f"training diverged by step {step}: {bad}. Lower the learning rates "
            f"(lr_d={lr_d:g}, lr_g={lr_g:g}) or check the data for NaN/inf, then resume from the last checkpoint."
        )
        self.step = step
        self.last_metrics = last_metrics


@dataclass
class EpochResult:
    """``metrics``: epoch means of METRICS. ``history``: one dict per log_every iterations ("step" + METRICS).

    ``images_per_sec`` counts real images consumed (d_steps batches per iteration).
    """

    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    images_per_sec: float = 0.0
    steps: int = 0
    seconds: float = 0.0


def unwrap(module: nn.Module) -> nn.Module:
    """The raw module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _optimizer(kind: str, parameters, lr: float, betas: tuple[float, float], capturable: bool):
    if kind == "adam":
        return torch.optim.Adam(parameters, lr=lr, betas=betas, capturable=capturable)
    if kind == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=lr, capturable=capturable)
    return torch.optim.SGD(parameters, lr=lr)  # stateless: safe to capture as it is


class GANTrainer(TrainerState, Sampling):
    """Trains a (generator, discriminator) pair; either may be wrapped in DistributedDataParallel.

    Under DDP each wrapper is called exactly once per its own update, with one
    backward after it: D's wrapper on cat([real, fake]) in D updates (one forward,
    so BatchNorm and DDP see a single pass, pytorch #175024), G's wrapper in G
    updates. Everywhere else the raw modules run: the detached fakes of a D update,
    D inside a G update (D's gradients are not needed there: that backward goes to
    G's parameters only), sampling. So sampling on rank 0 alone never waits on a
    collective.

    ``metric_reducer`` maps the stacked metric means before they are read (the
    Ray caller passes an all_reduce mean); NaN checks and early stopping use the
    reduced values, so every rank stops, or raises, at the same iteration.

    ``gradient_sync`` (``gan.parallel``) averages each update's gradients across
    workers before the optimizer step: data parallelism that the CUDA graph captures.

    On CUDA with ``cuda_graph`` the whole iteration runs as one captured CUDA
    graph (``gan.graph.CapturedIteration``). It falls back to eager mode on CPU, for wgan_gp (a double backward),
    and for DDP-wrapped modules (DDP needs extra NCCL settings and many eager
    warm-up iterations before its all-reduces can be captured; ``gradient_sync`` does not). Each capture is
    checked against eager mode on its first replay; a capture that raises or
    disagrees makes the trainer warn once and go on eagerly
    (``graph_fallback_reason`` says why).
    """

    loss_names = ("loss_d", "loss_g")  # what the graph check compares
    loss_indices = [METRICS.index(name) for name in loss_names]

    def __init__(self, generator: nn.Module, discriminator: nn.Module, config: EngineConfig, *,
                 device: torch.device | str, seed: int = 0,
                 metric_reducer: Callable[[Tensor], Tensor] | None = None,
                 gradient_sync: Callable[[list[Tensor]], None] | None = None):
        self.config = config
        self.device = torch.device(device)
        self.generator, self.discriminator = generator, discriminator
        self.g_module, self.d_module = unwrap(generator).to(self.device), unwrap(discriminator).to(self.device)
        self.latent_dim = self.g_module.latent_dim
        self.conditioning = conditioning_of(self.g_module)
        self.num_classes = self.conditioning.classes  # 0: unconditional, batches carry no labels
        self.loss = LOSSES[config.loss]
        self.metric_reducer = metric_reducer or (lambda metrics: metrics)
        self.gradient_sync = gradient_sync

        use_graph = (config.cuda_graph and self.device.type == "cuda" and config.loss != "wgan_gp"
                     and generator is self.g_module and discriminator is self.d_module)
        kind = config.optimizer
        if kind == "auto":
            kind = "rmsprop" if config.loss == "wgan" else "adam"
        self._g_params = [p for p in self.g_module.parameters() if p.requires_grad]
        self._d_params = [p for p in self.d_module.parameters() if p.requires_grad]
        self.capturable = use_graph  # optimizer state on the device, as graph capture needs
        self.opt_g = _optimizer(kind, self._g_params, config.lr_g, config.betas_g, self.capturable)
        self.opt_d = _optimizer(kind, self._d_params, config.lr_d, config.betas_d, self.capturable)
        # Staircase decay, counted in optimizer updates: lr * gamma ** (updates // every).
        self.sched_g = torch.optim.lr_scheduler.StepLR(self.opt_g, config.lr_decay_every, config.lr_decay_gamma)
        self.sched_d = torch.optim.lr_scheduler.StepLR(self.opt_d, config.lr_decay_every, config.lr_decay_gamma)

        # G-EMA: a moving average of G's weights samples, evaluates and is exported (Karras et al., Yazici et al.).
        self.g_ema = copy.deepcopy(self.g_module).eval().requires_grad_(False) if config.g_ema else None
        self.ema_updates = torch.zeros((), device=self.device)

        self.noise_generator = torch.Generator(device=self.device).manual_seed(seed)
        # Sampling draws from its own generator so that it never shifts the training noise.
        self.sample_generator = torch.Generator(device=self.device).manual_seed(seed + 1)
        self.fixed_labels = class_rows(self.num_classes, FIXED_PER_CLASS, self.device) if self.num_classes else None
        self.fixed_noise = self.noise(FIXED_NOISE_SIZE if self.fixed_labels is None else len(self.fixed_labels),
                                      self.sample_generator)

        self.step = 0
        self.d_updates = 0
        self.g_updates = 0
        self.stopped_early = False
        self.calm_checks = 0  # consecutive read-backs with mean D(G(z)) within 0.5 +- tol
        self.window_sum = torch.zeros(len(METRICS), device=self.device)
        self.window_steps = 0
        self.graph = CapturedIteration(self) if use_graph else None
        self.graph_fallback_reason: str | None = None  # why the CUDA graph was given up, if it was

    @property
    def use_graph(self) -> bool:
        """Whether iterations run as CUDA graph replays (False after a fallback)."""
        return self.graph is not None

    def stop_graph(self) -> None:
        """Train eagerly from now on, with non-capturable optimizers (the graph's fallback)."""
        self.graph_fallback_reason = self.graph.fallback_reason
        self.graph = None
        self.capturable = False

    # ---------------------------------------------------------------- one iteration

    def _autocast(self):
        # cache_enabled=False: autocast's weight cache is not allowed inside graph capture.
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.config.bf16, cache_enabled=False)

    def _d_update(self, real: Tensor, real_labels: Tensor | None = None) -> Tensor:
        """One D update; returns D_METRICS as a device tensor. A conditional D also sees the labels."""
        n = len(real)
        fake_labels = self.fake_labels(n)
        with torch.no_grad(), self._autocast():
            fake = self.g_module(self.noise(n), *label_args(fake_labels))
        batch = [real, fake.to(real.dtype)]
        labels = [] if fake_labels is None else [real_labels, fake_labels]
        if self.config.loss == "wgan_gp":
            points = interpolate(real, batch[1], self.noise_generator)
            batch.append(points)
            labels += [real_labels] if labels else []  # the penalty at (x, y) pairs: x's real end's class
        with self._autocast():
            output = self.discriminator(torch.cat(batch), *label_args(torch.cat(labels) if labels else None))
        logits, class_logits = self.conditioning.split_logits(output)
        real_logits, fake_logits = logits[:n], logits[n:2 * n]
        loss = self.loss.d_loss(real_logits, fake_logits, self.config.label_smoothing)
        if class_logits is not None:
            loss = loss + self.config.class_weight * self.conditioning.d_class_loss(class_logits, n, real_labels,
                                                                                    fake_labels)
        if self.config.loss == "wgan_gp":
            loss = loss + self.config.gp_weight * penalty_at(points, logits[2 * n:])
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        if self.gradient_sync is not None:
            self.gradient_sync(self._d_params)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self._d_params if p.grad is not None])
        self.opt_d.step()
        if self.config.loss == "wgan":
            clip_weights(self.d_module, self.config.clip_value)
        real_logits, fake_logits = real_logits.detach(), fake_logits.detach()
        accuracy = ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()) / 2
        # For wgan/hinge the critic's output is no probability; its sigmoid still shows the trend.
        return torch.stack([loss.detach(), torch.sigmoid(real_logits).mean(),
                            torch.sigmoid(fake_logits).mean(), accuracy, grad_norm])

    def _g_update(self, real: Tensor, real_labels: Tensor | None = None) -> Tensor:
        """One G update on fresh samples; returns G_METRICS as a device tensor.

        D scores the fakes inside cat([real, fake]), exactly as in its own update:
        with BatchNorm, D on a fakes-only batch normalizes with different
        statistics and becomes a different function that G cannot learn from.
        """
        n = len(real)
        fake_labels = self.fake_labels(n)
        labels = None if fake_labels is None else torch.cat([real_labels, fake_labels])
        with self._autocast():
            fake = self.generator(self.noise(n), *label_args(fake_labels))
            output = self.d_module(torch.cat([real, fake.to(real.dtype)]), *label_args(labels))
        logits, class_logits = self.conditioning.split_logits(output)
        loss = self.loss.g_loss(logits[n:])
        if class_logits is not None:
            loss = loss + self.config.class_weight * self.conditioning.g_class_loss(class_logits, n, fake_labels)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward(inputs=self._g_params)  # D's parameter gradients would be thrown away
        if self.gradient_sync is not None:
            self.gradient_sync(self._g_params)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self._g_params if p.grad is not None])
        self.opt_g.step()
        if self.g_ema is not None:
            self._update_ema()
        return torch.stack([loss.detach(), grad_norm])

    @torch.no_grad()
    def _update_ema(self) -> None:
        """g_ema <- decay * g_ema + (1 - decay) * G, with buffers (BatchNorm statistics) copied.

        The decay ramps up as (1 + n) / (10 + n) over the n-th update until it reaches
        ``g_ema`` (TensorFlow's ExponentialMovingAverage), so early samples are not
        dominated by the initial weights. Pure device work: it runs inside the graph.
        """
        self.ema_updates += 1
        decay = ((1 + self.ema_updates) / (10 + self.ema_updates)).clamp(max=self.config.g_ema)
        for average, live in zip(self.g_ema.parameters(), self.g_module.parameters()):
            average.lerp_(live, 1 - decay)
        for average, live in zip(self.g_ema.buffers(), self.g_module.buffers()):
            average.copy_(live)

    def iteration(self, reals: Sequence[Tensor], labels: Sequence[Tensor] | None = None) -> Tensor:
        """d_steps D updates, then g_steps G updates: pure device work, capturable as one graph."""
        labels = labels if labels is not None else [None] * len(reals)
        d_metrics = torch.stack([self._d_update(real, y) for real, y in zip(reals, labels)]).mean(0)
        g_metrics = torch.stack([self._g_update(reals[-1], labels[-1]) for _ in range(self.config.g_steps)]).mean(0)
        return torch.cat([d_metrics, g_metrics])

    def _count_updates(self, d_updates: int, g_updates: int) -> None:
        # Host bookkeeping stays outside the (possibly captured) iteration. The
        # schedulers step here, so an lr change takes effect from the next iteration.
        self.d_updates += d_updates
        self.g_updates += g_updates
        for _ in range(d_updates):
            self.sched_d.step()
        for _ in range(g_updates):
            self.sched_g.step()

    # ---------------------------------------------------------------- the loop

    def train_epoch(self, batches: Iterable[Tensor],
                    on_read: Callable[[dict[str, float]], None] | None = None) -> EpochResult:
        """Iterations over ``batches`` (device tensors, e.g. a ``gan.data.DeviceBatches``).

        Batches left over at the end (fewer than d_steps) are skipped. Raises
        DivergedError when a read-back sees NaN/inf; sets ``stopped_early`` and
        returns early when the early-stop rule fires. ``on_read`` (e.g. a progress
        bar) gets each read-back's row ("step" + METRICS) as it happens, so it costs
        no host sync of its own.
        """
        start = time.perf_counter()
        batches = iter(batches)
        self._pretrain_discriminator(batches)
        epoch_sum = torch.zeros(len(METRICS), device=self.device)
        history: list[dict[str, float]] = []
        steps = images = 0
        while not self.stopped_early:
            reals, labels = split_batches(itertools.islice(batches, self.config.d_steps), self.conditioning.labelled)
            if len(reals) < self.config.d_steps:
                break
            metrics = self.graph(reals, labels) if self.graph is not None else self.iteration(reals, labels)
            self._count_updates(self.config.d_steps, self.config.g_steps)
            self.step += 1
            steps += 1
            images += sum(len(real) for real in reals)
            epoch_sum += metrics
            self.window_sum += metrics
            self.window_steps += 1
            if self.step % self.config.log_every == 0:
                history.append(self._read_window())
                if on_read is not None:
                    on_read(history[-1])
        if self.window_steps and not self.stopped_early:
            history.append(self._read_window())  # a partial window: every epoch logs at least one point
            if on_read is not None:
                on_read(history[-1])
        means = self._read(epoch_sum / steps) if steps else {}
        self._check_finite(means)
        seconds = time.perf_counter() - start
        return EpochResult(metrics=means, history=history, images_per_sec=images / seconds,
                           steps=steps, seconds=seconds)

    def _pretrain_discriminator(self, batches: Iterator[Tensor]) -> None:
        """D-only updates before the first iteration (d_pretrain_steps of them, across epochs if need be)."""
        while self.step == 0 and self.d_updates < self.config.d_pretrain_steps:
            batch = next(batches, None)
            if batch is None:
                return
            self._d_update(*split_batch(batch))
            self._count_updates(1, 0)

    def _read(self, means: Tensor) -> dict[str, float]:
        """The one host read-back: reduce across workers, then copy to Python floats."""
        return dict(zip(METRICS, self.metric_reducer(means).tolist()))

    def _read_window(self) -> dict[str, float]:
        values = self._read(self.window_sum / self.window_steps)
        self.window_sum.zero_()
        self.window_steps = 0
        self._check_finite(values)
        if self.config.early_stop_patience > 0:
            calm = abs(values["d_fake"] - 0.5) <= self.config.early_stop_tol
            self.calm_checks = self.calm_checks + 1 if calm else 0
            self.stopped_early = self.calm_checks >= self.config.early_stop_patience
        return {"step": self.step, **values}

    def _check_finite(self, values: dict[str, float]) -> None:
        if not all(math.isfinite(v) for v in values.values()):
            raise DivergedError(self.step, values, self.opt_d.param_groups[0]["lr"],
                                self.opt_g.param_groups[0]["lr"])

