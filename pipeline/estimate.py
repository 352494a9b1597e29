"""How long a long run will take on a CPU, said once, up front, from its first timed iterations.

The default pipeline is a GPU job: on a laptop CPU it runs for hours. Rank 0 of the
train stage (and of the sweep's first trial to get there) times the iterations
between its first two read-backs of the engine (every ``train.log_every``
iterations, so no extra host sync), extrapolates to the whole stage, and, when that
is long, prints one line naming the quick command. Training time only: the
per-epoch evaluation and the fixed cost around training come on top.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

QUICK_COMMAND = "make demo"
LONG_RUN_S = 600  # a stage expected to take less says nothing
KV_NAMESPACE = "ganpipe"


def expected_seconds(seconds_per_iteration: float, iterations_per_epoch: int, epochs: int,
                     runs: int = 1, at_once: int = 1) -> float:
    """``runs`` runs (datasets, or trials ``at_once`` at a time) of ``epochs`` epochs each."""
    return seconds_per_iteration * iterations_per_epoch * epochs * math.ceil(runs / at_once)


def duration(seconds: float) -> str:
    """'2 h 05 min', '14 min', '40 s'."""
    if seconds < 60:
        return f"{round(seconds)} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def message(plan: dict, seconds_per_iteration: float, iterations_per_epoch: int, epochs: int) -> str | None:
    """The line to print, or None when the stage is short.

    ``plan``: {"stage": "train@mnist", "runs": datasets} for a train stage, or
    {"stage": "sweep", "runs": trials, "at_once": concurrent trials} for a sweep.
    """
    epoch_s = seconds_per_iteration * iterations_per_epoch
    runs, at_once = plan.get("runs", 1), plan.get("at_once", 1)
    if plan["stage"] == "sweep":
        total = expected_seconds(seconds_per_iteration, iterations_per_epoch, epochs, runs, at_once)
        if total < LONG_RUN_S:
            return None
        said = (f"sweep on this CPU: up to {duration(total)} of training ({runs} trials x {epochs} epochs "
                f"of {duration(epoch_s)}, {at_once} at a time; ASHA may stop some early)")
    else:
        one = expected_seconds(seconds_per_iteration, iterations_per_epoch, epochs)
        total = one * runs
        if total < LONG_RUN_S:
            return None
        said = f"{plan['stage']} on this CPU: about {duration(one)} of training ({epochs} epochs of {duration(epoch_s)})"
        if runs > 1:
            said += f", {duration(total)} for the {runs} datasets in data.datasets"
    return (f"{said}, timed on its first iterations; evaluation comes on top. A GPU does it in minutes; "
            f"for a first run that finishes here in minutes, stop this and run `{QUICK_COMMAND}`.")


class FirstWindow:
    """An engine ``on_read`` hook: times the iterations between the first two read-backs, says the estimate once."""

    def __init__(self, plan: dict, iterations_per_epoch: int, epochs: int,
                 then: Optional[Callable[[dict], None]] = None, say: Callable[[str], None] = print):
        self.plan, self.iterations_per_epoch, self.epochs = plan, iterations_per_epoch, epochs
        self.then, self.say = then, say
        self.first: tuple[float, float] | None = None  # (step, time) at the first read-back
        self.done = False

    def __call__(self, row: dict) -> None:
        if not self.done:
            now = time.perf_counter()
            if self.first is None:  # the first window holds one-time costs (allocation, warm-up): skip it
                self.first = (row["step"], now)
            elif row["step"] > self.first[0]:
                self.done = True
                per_iteration = (now - self.first[1]) / (row["step"] - self.first[0])
                line = message(self.plan, per_iteration, self.iterations_per_epoch, self.epochs)
                if line and _first_to_say(self.plan):
                    self.say(line)
        if self.then:
            self.then(row)


def hook(plan: dict | None, device, iterations_per_epoch: int, epochs: int,
         then: Optional[Callable[[dict], None]] = None) -> Optional[Callable[[dict], None]]:
    """``then`` wrapped by a FirstWindow on a CPU (a GPU run is quick enough); ``then`` unchanged otherwise."""
    if not plan or device.type != "cpu":
        return then
    return FirstWindow(plan, iterations_per_epoch, epochs, then=then, say=lambda line: print(line, flush=True))


def _first_to_say(plan: dict) -> bool:
    """Whether this process says the estimate: the sweep's concurrent trials agree through Ray's KV store."""
    key = plan.get("once_key")
    if not key:
        return True
    from ray.experimental.internal_kv import _internal_kv_put

    return not _internal_kv_put(key, b"1", overwrite=False, namespace=KV_NAMESPACE)
