"""A trainer's state: everything a bit-exact resume needs, and its checkpoint files.

``GANTrainer`` takes these methods from ``TrainerState``; they read and restore
its models, optimizers, schedulers, counters and random number generators.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor


class TrainerState:
    """state_dict / load_state_dict / save_checkpoint / load_checkpoint of a ``GANTrainer``."""

    def state_dict(self) -> dict:
        """Everything a bit-exact resume needs, as tensors and plain containers (torch.load weights_only)."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "generator": self.g_module.state_dict(),
            "discriminator": self.d_module.state_dict(),
            "g_ema": self.g_ema.state_dict() if self.g_ema is not None else {},
            "ema_updates": self.ema_updates,
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "sched_d": self.sched_d.state_dict(),
            "counters": {"step": self.step, "d_updates": self.d_updates, "g_updates": self.g_updates,
                         "calm_checks": self.calm_checks, "stopped_early": self.stopped_early,
                         "window_steps": self.window_steps},
            "window_sum": self.window_sum.clone(),
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
        state = on_cpu(state)
        self.g_module.load_state_dict(state["generator"])
        self.d_module.load_state_dict(state["discriminator"])
        if self.g_ema is not None:
            # A checkpoint of a run without the average starts it from the loaded G.
            self.g_ema.load_state_dict(state.get("g_ema") or state["generator"])
            self.ema_updates.copy_(state.get("ema_updates", torch.zeros(())))
        for optimizer, key in ((self.opt_g, "opt_g"), (self.opt_d, "opt_d")):
            optimizer.load_state_dict(_with_capturable(state[key], self.capturable))
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        self._apply_configured_lrs()
        counters = state["counters"]
        self.step, self.d_updates, self.g_updates = counters["step"], counters["d_updates"], counters["g_updates"]
        self.calm_checks, self.stopped_early = counters["calm_checks"], counters["stopped_early"]
        self.window_steps = counters["window_steps"]
        self.window_sum = state["window_sum"].to(self.device)
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
        if self.graph is not None:
            self.graph.reset()  # the optimizers hold new state tensors: capture again

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



def map_tensors(value, function: Callable[[Tensor], Tensor]):
    """A copy of a nested state with ``function`` applied to every tensor."""
    if isinstance(value, Tensor):
        return function(value)
    if isinstance(value, dict):
        return {key: map_tensors(item, function) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(item, function) for item in value)
    return value


def cloned(value):
    """A deep copy of a nested state, on the same devices."""
    return map_tensors(value, lambda tensor: tensor.detach().clone())


def on_cpu(value):
    """A copy of a nested state with every tensor on the CPU."""
    return map_tensors(value, Tensor.cpu)


def _with_capturable(optimizer_state: dict, capturable: bool) -> dict:
    """The optimizer state with this trainer's ``capturable`` flag, so that state moves to the right device.

    A checkpoint from a CUDA-graph run loads on CPU (and the other way round):
    ``Optimizer.load_state_dict`` places Adam's step counters by the saved flag.
    """
    groups = [{**group, "capturable": capturable} if "capturable" in group else group
              for group in optimizer_state["param_groups"]]
    return {**optimizer_state, "param_groups": groups}

