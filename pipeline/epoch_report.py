"""What rank 0 reports each epoch: quality against the evaluator, MLflow metrics and grids, the DVC curves.

Only rank 0 of a training run (or a sweep trial) evaluates and logs; the other
workers train. ``History`` holds the rows DVC's plots draw and travels inside
every checkpoint, so a resumed run continues its curves. A resumed run does not
log again what MLflow already holds: the epochs a lost attempt got to log after
its last checkpoint keep their first points and grids.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gan.data import DATASETS
from gan.engine import GANTrainer
from gan.images import density_plot, image_grid, save_png
from gan.metrics import evaluate
from pipeline import cluster, resume, tracking
from pipeline.spool import SpooledClient, is_transport_failure

# MLflow metric keys, grouped by prefix so the UI charts them together.
STEP_METRICS = {"loss_d": "loss/d", "loss_g": "loss/g", "d_real": "d/real", "d_fake": "d/fake",
                "d_acc": "d/acc", "grad_norm_d": "grad/d", "grad_norm_g": "grad/g"}
STATUS_FILE = "status.json"
IMAGE_KEY = "images/samples"  # where ``logged_steps`` files the steps of the per-epoch grid


def logged_steps(client: SpooledClient, run_id: str) -> dict[str, set[int]]:
    """The steps a run holds per metric key, and its sample grids' steps under ``IMAGE_KEY``."""
    steps = {key: {m.step for m in client.get_metric_history(run_id, key)}
             for key in client.get_run(run_id).data.metrics}
    steps[IMAGE_KEY] = client.logged_image_steps(run_id, "samples")
    return steps


def toy_quality(samples: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    from scipy.stats import wasserstein_distance

    fake = samples.detach().double().flatten().cpu().numpy()
    return {"mean": float(fake.mean()), "std": float(fake.std()),
            "wasserstein": float(wasserstein_distance(fake, real.double().flatten().cpu().numpy()))}


@dataclass
class History:
    """The curves DVC plots draw: rows per log read-back and per epoch."""

    losses: list[dict] = field(default_factory=list)
    quality: list[dict] = field(default_factory=list)

    def save(self, folder: Path) -> None:
        pd.DataFrame(self.losses).to_csv(folder / "losses.csv", index=False)
        pd.DataFrame(self.quality).to_csv(folder / "quality.csv", index=False)

    @classmethod
    def load(cls, folder: Path) -> "History":
        return cls(losses=_rows(folder / "losses.csv"), quality=_rows(folder / "quality.csv"))


def _rows(csv: Path) -> list[dict]:
    """A CSV's rows; a run that diverged in its first epoch leaves an empty file."""
    return pd.read_csv(csv).to_dict("records") if csv.stat().st_size > 1 else []


class RankZeroLogger:
    """Everything only rank 0 does: quality evaluation, MLflow logging, output files."""

    def __init__(self, run, device: torch.device):
        """``run``: the ``pipeline.loop.LoopRun`` rank 0 trains."""
        cfg, dataset = run.cfg, run.dataset
        self.cfg, self.dataset, self.device = cfg, dataset, device
        self.toy = DATASETS[dataset].kind == "toy"
        # An outage of the tracking server spools this run's metrics and grids; training goes on.
        self.client = SpooledClient(run.tracking_uri, run.spool_root)
        self.run_id = run.mlflow_run_id
        self.evaluator, self.reference = cluster.worker_reference(run.inputs, dataset, device)
        self.eval_samples = cfg.train.eval_samples
        self.logged: dict[str, set[int]] = {}  # on a resumed run: the steps MLflow already holds, per key

    def resumed(self, from_epoch: int) -> None:
        """Tag the resume, and note what the lost attempt logged: epochs past its checkpoint run again."""
        self.client.set_tag(self.run_id, resume.TAG_RESUMED, str(from_epoch))
        try:
            self.logged = logged_steps(self.client, self.run_id)
        except Exception as err:
            if not is_transport_failure(err):
                raise
            print("MLflow is not answering: an epoch the lost attempt logged after its checkpoint may show twice",
                  flush=True)

    def _log_rows(self, rows: list[tuple[dict[str, float], int]]) -> None:
        """Metric rows, less the (key, step) points MLflow already holds."""
        tracking.log_metric_rows(self.client, self.run_id, [
            ({k: v for k, v in values.items() if step not in self.logged.get(k, ())}, step) for values, step in rows])

    def epoch_end(self, trainer: GANTrainer, result, epoch: int, history: History, world: int) -> dict:
        self._log_rows([({STEP_METRICS[k]: v for k, v in row.items() if k in STEP_METRICS}, row["step"])
                        for row in result.history])
        history.losses.extend({"epoch": epoch, **row} for row in result.history)
        if self.toy:
            quality = toy_quality(trainer.sample(self.eval_samples), self.reference)
        else:
            # A conditional model is asked for each class in turn: cond_accuracy, fid_class_<k> and the
            # variety within each class (<precision|recall|density|coverage>_class_<k>, their _within_class means).
            quality = evaluate(trainer.sample, self.evaluator, self.reference, n=self.cfg.train.eval_samples,
                               device=self.device, conditional=trainer.conditioning.labelled)
        quality = {k: float(v) for k, v in quality.items()}
        speed = result.images_per_sec * world
        # What the engine really runs with: the optimizers' current lrs and exact update counts.
        engine_state = {"opt/lr_g": trainer.opt_g.param_groups[0]["lr"], "opt/lr_d": trainer.opt_d.param_groups[0]["lr"],
                        "opt/d_updates": trainer.d_updates, "opt/g_updates": trainer.g_updates}
        self._log_rows([({**{f"quality/{k}": v for k, v in quality.items()}, "speed/img_per_s": speed,
                          "epoch": epoch, **engine_state}, epoch)])
        # The headline figure last: DVC's quality plot draws the last column.
        main_key = "wasserstein" if self.toy else "fid"
        history.quality.append({"epoch": epoch, "step": trainer.step, "images_per_sec": speed,
                                **{k: v for k, v in quality.items() if k != main_key}, main_key: quality[main_key]})
        if epoch not in self.logged.get(IMAGE_KEY, ()):
            self.client.log_image(self.run_id, self.picture(trainer), key="samples", step=epoch)
        headline = (f"fid {quality['fid']:.3f}" if not self.toy else
                    f"mean {quality['mean']:.3f} std {quality['std']:.3f}")
        print(f"epoch {epoch}/{self.cfg.train.epochs}  {speed:,.0f} img/s  loss_d {result.metrics['loss_d']:.4f}  "
              f"loss_g {result.metrics['loss_g']:.4f}  {headline}", flush=True)
        return quality

    def picture(self, trainer: GANTrainer) -> np.ndarray:
        if self.toy:
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "density.png"
                density_plot(self.reference.cpu().numpy(), trainer.sample(self.eval_samples).cpu().numpy(), path)
                from PIL import Image

                return np.asarray(Image.open(path).convert("RGB"))
        # Fixed noise (and, for a conditional model, fixed labels: one row per class): each step is comparable.
        return image_grid(trainer.sample(noise=trainer.fixed_noise, labels=trainer.fixed_labels), nrow=8)

    def write_outputs(self, trainer: GANTrainer, folder: Path, status: dict) -> None:
        torch.save(trainer.generator_record(self.cfg.model.model_dump(), self.dataset), folder / "generator.pt")
        save_png(self.picture(trainer), folder / "samples.png")
        (folder / STATUS_FILE).write_text(json.dumps(status, default=float))
