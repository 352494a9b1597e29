"""The GAN training loop: D:G ratios, optimizers, LR decay, metrics, checkpoints, CUDA graphs.

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

import contextlib
import copy
import itertools
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from gan.losses import LOSSES, clip_weights, interpolate, penalty_at

# The order of the metrics tensor that every iteration produces: D's five, then G's two.
D_METRICS = ("loss_d", "d_real", "d_fake", "d_acc", "grad_norm_d")
G_METRICS = ("loss_g", "grad_norm_g")
METRICS = D_METRICS + G_METRICS

NOISE_KINDS = ("gaussian", "uniform")
OPTIMIZERS = ("auto", "adam", "rmsprop", "sgd")
FIXED_NOISE_SIZE = 64  # the sample grid: 8 x 8
GRAPH_WARMUP_ITERATIONS = 3  # eager iterations on a side stream before capture (CUDA graphs docs)
LOSS_INDICES = [METRICS.index("loss_d"), METRICS.index("loss_g")]  # what the graph check compares
# How far a graph replay's losses may sit from eager mode's for the same iteration (relative and absolute):
# the same kernels in another launch order; bf16 rounds at about 4e-3.
GRAPH_TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2}


@dataclass
class EngineConfig:
    """The training knobs; names and defaults match params.yaml ``train:``."""

    loss: str = "ns"
    label_smoothing: float = 0.0
    noise: str = "gaussian"
    optimizer: str = "auto"
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas_g: tuple[float, float] = (0.5, 0.999)
    betas_d: tuple[float, float] = (0.5, 0.999)
    d_steps: int = 1
    g_steps: int = 1
    clip_value: float = 0.01
    gp_weight: float = 10.0
    lr_decay_gamma: float = 1.0
    lr_decay_every: int = 1000
    d_pretrain_steps: int = 0
    early_stop_patience: int = 0
    early_stop_tol: float = 0.05
    log_every: int = 50
    bf16: bool = False
    cuda_graph: bool = True
    g_ema: float = 0.0  # decay of the moving average of G's weights that samples (0: off)

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
        """The config from a params ``train:`` section; keys that are not engine knobs are skipped."""
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


class GANTrainer:
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

    On CUDA with ``cuda_graph`` the whole iteration runs as one captured CUDA
    graph. It falls back to eager mode on CPU, for wgan_gp (a double backward),
    and for DDP-wrapped modules (DDP needs extra NCCL settings and many eager
    warm-up iterations before its all-reduces can be captured). Each capture is
    checked against eager mode on its first replay; a capture that raises or
    disagrees makes the trainer warn once and go on eagerly
    (``graph_fallback_reason`` says why).
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, config: EngineConfig, *,
                 device: torch.device | str, seed: int = 0,
                 metric_reducer: Callable[[Tensor], Tensor] | None = None):
        self.config = config
        self.device = torch.device(device)
        self.generator, self.discriminator = generator, discriminator
        self.g_module, self.d_module = unwrap(generator).to(self.device), unwrap(discriminator).to(self.device)
        self.latent_dim = self.g_module.latent_dim
        self.loss = LOSSES[config.loss]
        self.metric_reducer = metric_reducer or (lambda metrics: metrics)

        self.use_graph = (config.cuda_graph and self.device.type == "cuda" and config.loss != "wgan_gp"
                          and generator is self.g_module and discriminator is self.d_module)
        kind = config.optimizer
        if kind == "auto":
            kind = "rmsprop" if config.loss == "wgan" else "adam"
        self._g_params = [p for p in self.g_module.parameters() if p.requires_grad]
        self._d_params = [p for p in self.d_module.parameters() if p.requires_grad]
        self._capturable = self.use_graph  # optimizer state on the device, as graph capture needs
        self.opt_g = _optimizer(kind, self._g_params, config.lr_g, config.betas_g, self._capturable)
        self.opt_d = _optimizer(kind, self._d_params, config.lr_d, config.betas_d, self._capturable)
        # Staircase decay, counted in optimizer updates: lr * gamma ** (updates // every).
        self.sched_g = torch.optim.lr_scheduler.StepLR(self.opt_g, config.lr_decay_every, config.lr_decay_gamma)
        self.sched_d = torch.optim.lr_scheduler.StepLR(self.opt_d, config.lr_decay_every, config.lr_decay_gamma)

        # G-EMA: a moving average of G's weights samples, evaluates and is exported (Karras et al., Yazici et al.).
        self.g_ema = copy.deepcopy(self.g_module).eval().requires_grad_(False) if config.g_ema else None
        self._ema_updates = torch.zeros((), device=self.device)

        self.noise_generator = torch.Generator(device=self.device).manual_seed(seed)
        # Sampling draws from its own generator so that it never shifts the training noise.
        self.sample_generator = torch.Generator(device=self.device).manual_seed(seed + 1)
        self.fixed_noise = self.noise(FIXED_NOISE_SIZE, self.sample_generator)

        self.step = 0
        self.d_updates = 0
        self.g_updates = 0
        self.stopped_early = False
        self._calm_checks = 0  # consecutive read-backs with mean D(G(z)) within 0.5 +- tol
        self._window_sum = torch.zeros(len(METRICS), device=self.device)
        self._window_steps = 0
        self._replay: Callable[[], Tensor] | None = None  # the captured iteration
        self._graph_lrs: tuple[float, float] | None = None
        self._graph_warmup_left = GRAPH_WARMUP_ITERATIONS
        self.graph_fallback_reason: str | None = None  # why the CUDA graph was given up, if it was

    # ---------------------------------------------------------------- noise and sampling

    def noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n latent vectors: N(0, 1), or U[-1, 1] for ``noise="uniform"``."""
        generator = generator or self.noise_generator
        shape = (n, self.latent_dim)
        if self.config.noise == "uniform":
            return torch.rand(shape, generator=generator, device=self.device) * 2 - 1
        return torch.randn(shape, generator=generator, device=self.device)

    @property
    def sampling_generator(self) -> nn.Module:
        """The G that samples, evaluates and is exported: the moving average when ``g_ema`` is on."""
        return self.g_ema if self.g_ema is not None else self.g_module

    @torch.no_grad()
    def sample(self, n: int | None = None, noise: Tensor | None = None) -> Tensor:
        """n fresh samples, or G(noise), in eval mode (BatchNorm running statistics); G's mode is restored after."""
        if noise is None:
            noise = self.noise(n, self.sample_generator)
        generator = self.sampling_generator
        was_training = generator.training
        generator.eval()
        try:
            return generator(noise.to(self.device))
        finally:
            generator.train(was_training)

    def generate(self, n: int, batch_size: int = 1000) -> Tensor:
        """n samples on the trainer's device, drawn ``batch_size`` at a time."""
        return torch.cat([self.sample(min(batch_size, n - start)) for start in range(0, n, batch_size)])

    # ---------------------------------------------------------------- one iteration

    def _autocast(self):
        # cache_enabled=False: autocast's weight cache is not allowed inside graph capture.
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.config.bf16, cache_enabled=False)

    def _d_update(self, real: Tensor) -> Tensor:
        """One D update; returns D_METRICS as a device tensor."""
        n = len(real)
        with torch.no_grad(), self._autocast():
            fake = self.g_module(self.noise(n))
        batch = [real, fake.to(real.dtype)]
        if self.config.loss == "wgan_gp":
            points = interpolate(real, batch[1], self.noise_generator)
            batch.append(points)
        with self._autocast():
            logits = self.discriminator(torch.cat(batch)).float()
        real_logits, fake_logits = logits[:n], logits[n:2 * n]
        loss = self.loss.d_loss(real_logits, fake_logits, self.config.label_smoothing)
        if self.config.loss == "wgan_gp":
            loss = loss + self.config.gp_weight * penalty_at(points, logits[2 * n:])
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self._d_params if p.grad is not None])
        self.opt_d.step()
        if self.config.loss == "wgan":
            clip_weights(self.d_module, self.config.clip_value)
        real_logits, fake_logits = real_logits.detach(), fake_logits.detach()
        accuracy = ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()) / 2
        # For wgan/hinge the critic's output is no probability; its sigmoid still shows the trend.
        return torch.stack([loss.detach(), torch.sigmoid(real_logits).mean(),
                            torch.sigmoid(fake_logits).mean(), accuracy, grad_norm])

    def _g_update(self, real: Tensor) -> Tensor:
        """One G update on fresh samples; returns G_METRICS as a device tensor.

        D scores the fakes inside cat([real, fake]), exactly as in its own update:
        with BatchNorm, D on a fakes-only batch normalizes with different
        statistics and becomes a different function that G cannot learn from.
        """
        n = len(real)
        with self._autocast():
            fake = self.generator(self.noise(n))
            logits = self.d_module(torch.cat([real, fake.to(real.dtype)]))[n:].float()
        loss = self.loss.g_loss(logits)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward(inputs=self._g_params)  # D's parameter gradients would be thrown away
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
        self._ema_updates += 1
        decay = ((1 + self._ema_updates) / (10 + self._ema_updates)).clamp(max=self.config.g_ema)
        for average, live in zip(self.g_ema.parameters(), self.g_module.parameters()):
            average.lerp_(live, 1 - decay)
        for average, live in zip(self.g_ema.buffers(), self.g_module.buffers()):
            average.copy_(live)

    def _iteration(self, reals: Sequence[Tensor]) -> Tensor:
        """d_steps D updates, then g_steps G updates: pure device work, capturable as one graph."""
        d_metrics = torch.stack([self._d_update(real) for real in reals]).mean(0)
        g_metrics = torch.stack([self._g_update(reals[-1]) for _ in range(self.config.g_steps)]).mean(0)
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

    # ---------------------------------------------------------------- CUDA graph

    def _graph_iteration(self, reals: list[Tensor]) -> Tensor:
        """The iteration as one CUDA graph replay: real batches are copied into a static buffer.

        The first iterations run eagerly on a side stream (they train for real),
        which creates the optimizer state and picks the kernels before capture.
        A changed learning rate (capturable optimizers bake a float lr into the
        graph) or loaded optimizer state means a fresh capture.
        """
        if self._replay is None and self._graph_warmup_left > 0:
            self._graph_warmup_left -= 1
            with self._side_stream():
                return self._iteration(reals)
        lrs = (self.opt_d.param_groups[0]["lr"], self.opt_g.param_groups[0]["lr"])
        if self._replay is not None and (lrs != self._graph_lrs or reals[0].shape != self._static_reals.shape[1:]):
            self._replay = None
        if self._replay is None:
            return self._capture_checked(reals, lrs)
        for buffer, real in zip(self._static_reals, reals):
            buffer.copy_(real)
        return self._replay()  # overwritten by the next replay: the caller accumulates it first

    def _capture_checked(self, reals: list[Tensor], lrs: tuple[float, float]) -> Tensor:
        """Capture the iteration and prove it on its first replay, or fall back to eager mode for good.

        The same iteration runs eagerly first; then the state is rolled back and the
        graph replays it. Their losses must agree within fp32 (or bf16) tolerance. A
        capture or replay that raises, or a graph that computes something else, is
        warned about once; the state is rolled back and training goes on eagerly.
        """
        snapshot = _cloned(self.state_dict())
        expected = self._iteration(reals)[LOSS_INDICES]
        # A loaded optimizer adopts the tensors it is given and updates them in place: load a copy.
        self.load_state_dict(_cloned(snapshot))
        try:
            self._static_reals = torch.stack(reals)
            self._replay = self._capture(self._static_reals)
            metrics = self._replay()
            problem = self._graph_mismatch(expected, metrics[LOSS_INDICES])
        except Exception as err:  # noqa: BLE001 - whatever breaks the graph, eager mode still trains
            problem = f"capture or first replay raised {type(err).__name__}: {err}"
        if problem is None:
            self._graph_lrs = lrs
            return metrics
        warnings.warn(f"CUDA graph disabled, training continues in eager mode: {problem}", RuntimeWarning,
                      stacklevel=2)
        self.use_graph = self._capturable = False
        self.graph_fallback_reason = problem
        self.load_state_dict(snapshot)  # also drops the graph and makes the optimizers non-capturable
        return self._iteration(reals)

    def _capture(self, static_reals: Tensor) -> Callable[[], Tensor]:
        """Capture ``_iteration(static_reals)`` as a CUDA graph; returns its replay (-> the metrics tensor)."""
        self.opt_d.zero_grad(set_to_none=True)  # backward allocates .grad from the graph's pool
        self.opt_g.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.noise_generator)  # fresh noise on every replay
        # thread_local: CUDA calls of other threads (e.g. a Ray worker's) do not break the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_metrics = self._iteration(static_reals)

        def replay() -> Tensor:
            graph.replay()
            return static_metrics

        return replay

    def _graph_mismatch(self, eager: Tensor, graph: Tensor) -> str | None:
        """None when the graph's losses match the eager ones, else what differs (one host read-back)."""
        tolerance = GRAPH_TOLERANCE["bf16" if self.config.bf16 else "fp32"]
        if torch.allclose(graph.float(), eager.float(), rtol=tolerance, atol=tolerance):
            return None
        names = [METRICS[i] for i in LOSS_INDICES]
        return (f"the captured graph's losses {dict(zip(names, graph.tolist()))} differ from eager mode's "
                f"{dict(zip(names, eager.tolist()))} by more than {tolerance:g}")

    @contextlib.contextmanager
    def _side_stream(self):
        """Eager warm-up before a capture runs on a side stream (CUDA graphs docs); elsewhere a no-op."""
        if self.device.type != "cuda":
            yield
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream(self.device).wait_stream(stream)

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
            reals = list(itertools.islice(batches, self.config.d_steps))
            if len(reals) < self.config.d_steps:
                break
            metrics = self._graph_iteration(reals) if self.use_graph else self._iteration(reals)
            self._count_updates(self.config.d_steps, self.config.g_steps)
            self.step += 1
            steps += 1
            images += sum(len(real) for real in reals)
            epoch_sum += metrics
            self._window_sum += metrics
            self._window_steps += 1
            if self.step % self.config.log_every == 0:
                history.append(self._read_window())
                if on_read is not None:
                    on_read(history[-1])
        if self._window_steps and not self.stopped_early:
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
            real = next(batches, None)
            if real is None:
                return
            self._d_update(real)
            self._count_updates(1, 0)

    def _read(self, means: Tensor) -> dict[str, float]:
        """The one host read-back: reduce across workers, then copy to Python floats."""
        return dict(zip(METRICS, self.metric_reducer(means).tolist()))

    def _read_window(self) -> dict[str, float]:
        values = self._read(self._window_sum / self._window_steps)
        self._window_sum.zero_()
        self._window_steps = 0
        self._check_finite(values)
        if self.config.early_stop_patience > 0:
            calm = abs(values["d_fake"] - 0.5) <= self.config.early_stop_tol
            self._calm_checks = self._calm_checks + 1 if calm else 0
            self.stopped_early = self._calm_checks >= self.config.early_stop_patience
        return {"step": self.step, **values}

    def _check_finite(self, values: dict[str, float]) -> None:
        if not all(math.isfinite(v) for v in values.values()):
            raise DivergedError(self.step, values, self.opt_d.param_groups[0]["lr"],
                                self.opt_g.param_groups[0]["lr"])

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """Everything a bit-exact resume needs, as tensors and plain containers (torch.load weights_only)."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "generator": self.g_module.state_dict(),
            "discriminator": self.d_module.state_dict(),
            "g_ema": self.g_ema.state_dict() if self.g_ema is not None else {},
            "ema_updates": self._ema_updates,
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "sched_d": self.sched_d.state_dict(),
            "counters": {"step": self.step, "d_updates": self.d_updates, "g_updates": self.g_updates,
                         "calm_checks": self._calm_checks, "stopped_early": self.stopped_early,
                         "window_steps": self._window_steps},
            "window_sum": self._window_sum.clone(),
            "device_type": self.device.type,
            "rng": rng,
            "noise_generator": self.noise_generator.get_state(),
            "sample_generator": self.sample_generator.get_state(),
            "fixed_noise": self.fixed_noise.clone(),
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: dict) -> None:
        # Whatever map_location the state was loaded with: RNG states must be CPU
        # tensors, and the optimizers place their own state (Adam keeps "step" on
        # the CPU unless capturable).
        state = _on_cpu(state)
        self.g_module.load_state_dict(state["generator"])
        self.d_module.load_state_dict(state["discriminator"])
        if self.g_ema is not None:
            # A checkpoint of a run without the average starts it from the loaded G.
            self.g_ema.load_state_dict(state.get("g_ema") or state["generator"])
            self._ema_updates.copy_(state.get("ema_updates", torch.zeros(())))
        for optimizer, key in ((self.opt_g, "opt_g"), (self.opt_d, "opt_d")):
            optimizer.load_state_dict(_with_capturable(state[key], self._capturable))
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        self._apply_configured_lrs()
        counters = state["counters"]
        self.step, self.d_updates, self.g_updates = counters["step"], counters["d_updates"], counters["g_updates"]
        self._calm_checks, self.stopped_early = counters["calm_checks"], counters["stopped_early"]
        self._window_steps = counters["window_steps"]
        self._window_sum = state["window_sum"].to(self.device)
        self.fixed_noise = state["fixed_noise"].to(self.device)
        if state["device_type"] == self.device.type:
            torch.set_rng_state(state["rng"]["cpu"])
            if self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
            self.noise_generator.set_state(state["noise_generator"])
            self.sample_generator.set_state(state["sample_generator"])
        else:
            warnings.warn(f"checkpoint saved on {state['device_type']}, loaded on {self.device.type}: "
                          "random number states not restored, so the resumed run is not bit-exact")
        self._replay = None  # the optimizers hold new state tensors: capture again

    def _apply_configured_lrs(self) -> None:
        """This trainer's lr_g / lr_d win over a loaded checkpoint's, at the same point of the decay.

        A plain resume has the same config, so nothing changes; a population-based
        sweep loads another trial's weights under newly explored learning rates.
        """
        for optimizer, scheduler, lr in ((self.opt_g, self.sched_g, self.config.lr_g),
                                         (self.opt_d, self.sched_d, self.config.lr_d)):
            decayed = lr * self.config.lr_decay_gamma ** (scheduler.last_epoch // self.config.lr_decay_every)
            scheduler.base_lrs = [lr] * len(optimizer.param_groups)
            for group in optimizer.param_groups:
                group["initial_lr"], group["lr"] = lr, decayed

    def save_checkpoint(self, path: str | Path, *, batches=None) -> None:
        """torch.save of ``state_dict()``, plus ``batches.state_dict()`` (e.g. a DeviceBatches) if given."""
        state = self.state_dict()
        if batches is not None:
            state["batches"] = batches.state_dict()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)

    def load_checkpoint(self, path: str | Path, *, batches=None) -> None:
        """Restores a ``save_checkpoint`` file, and ``batches``' state when given."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.load_state_dict(state)
        if batches is not None:
            if "batches" not in state:
                raise ValueError(f"{path}: the checkpoint holds no batch iterator state")
            batches.load_state_dict(state["batches"])


def _map_tensors(value, function: Callable[[Tensor], Tensor]):
    """A copy of a nested state with ``function`` applied to every tensor."""
    if isinstance(value, Tensor):
        return function(value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, function) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(item, function) for item in value)
    return value


def _cloned(value):
    """A deep copy of a nested state, on the same devices."""
    return _map_tensors(value, lambda tensor: tensor.detach().clone())


def _on_cpu(value):
    """A copy of a nested state with every tensor on the CPU."""
    return _map_tensors(value, Tensor.cpu)


def _with_capturable(optimizer_state: dict, capturable: bool) -> dict:
    """The optimizer state with this trainer's ``capturable`` flag, so that state moves to the right device.

    A checkpoint from a CUDA-graph run loads on CPU (and the other way round):
    ``Optimizer.load_state_dict`` places Adam's step counters by the saved flag.
    """
    groups = [{**group, "capturable": capturable} if "capturable" in group else group
              for group in optimizer_state["param_groups"]]
    return {**optimizer_state, "param_groups": groups}
