"""evaluator@<dataset>: train the classifier that measures sample quality.

Writes models/evaluator/<dataset>.pt and metrics/evaluator/<dataset>.json, the
yardstick's ends: the real-vs-real floor (train split vs test split, what a
perfect generator reaches; with the within-class figures of replaying each
class's train images) and the ceilings (uniform noise, a single class), so
every GAN figure can be read against them. What users compare across DVC
experiments, the accuracy and the FID and recall floors, is also the DVC metric
metrics/<dataset>/evaluator.json; the ceilings stay out of `dvc metrics show`.

The 1-D toy set has no classes: its "evaluator" is the real test sample itself,
and its quality is measured by moments and the Wasserstein-1 distance.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from gan.data import DATASETS
from gan.evaluator_net import save_evaluator, train_evaluator
from gan.metrics import reference_scores
from pipeline import tracking
from pipeline.config import Config
from pipeline.modeling import pick_device
from pipeline.artifacts import evaluator_paths, load_processed

# Samples per side when computing the floor and ceilings.
REFERENCE_SAMPLES = 10_000


def run(cfg: Config, dataset: str) -> dict:
    arrays = load_processed(dataset)  # first: a missing input leaves no empty output folders
    paths = evaluator_paths(dataset)
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    if DATASETS[dataset].kind == "toy":
        real = arrays["x_train"][:, 0]
        torch.save({"kind": "toy"}, paths["model"])
        report = {"kind": "toy", "real_mean": float(real.mean()), "real_std": float(real.std())}
        paths["yardstick"].write_text(json.dumps(report, indent=2) + "\n")
        tracking.write_dvc_metrics(paths["metrics"], {k: report[k] for k in ("real_mean", "real_std")})
        return report

    device = pick_device(cfg.ray.use_gpu)
    started = time.perf_counter()
    net, scores = train_evaluator(
        arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
        epochs=cfg.evaluator.epochs, batch_size=cfg.evaluator.batch_size, lr=cfg.evaluator.lr,
        seed=cfg.evaluator.seed, device=device,
    )
    save_evaluator(net, paths["model"], meta={"dataset": dataset, **scores})
    n = min(REFERENCE_SAMPLES, len(arrays["x_test"]), len(arrays["x_train"]))
    references = reference_scores(net, arrays["x_train"], arrays["x_test"], arrays["y_test"], n=n, device=device,
                                  real_train_labels=arrays["y_train"])
    report = {"dataset": dataset, **scores, "train_seconds": round(time.perf_counter() - started, 1),
              "reference_samples": n, **{name: _rounded(values) for name, values in references.items()}}
    paths["yardstick"].write_text(json.dumps(report, indent=2) + "\n")
    floor, noise = references["real_vs_real"], references["noise"]["fid"]
    tracking.write_dvc_metrics(paths["metrics"], {"test_accuracy": scores["test_accuracy"],
                                                  "floor": {"fid": floor["fid"], "recall": floor["recall"]}})
    print(f"evaluator@{dataset}: test accuracy {scores['test_accuracy']:.4f}; real vs real: FID {floor['fid']:.3f} "
          f"(noise ceiling {noise:.1f}), precision {floor['precision']:.3f}, recall {floor['recall']:.3f}, "
          f"density {floor['density']:.3f}, coverage {floor['coverage']:.3f}, "
          f"recall within a class {floor['recall_within_class']:.3f}")
    return report


def _rounded(values: dict) -> dict:
    return {key: float(np.round(value, 6)) for key, value in values.items()}
