"""gan.variety: precision, recall, density and coverage against their definitions and known values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gan.variety import VARIETY_KEYS, variety, variety_within_class


def by_definition(real: np.ndarray, fake: np.ndarray, k: int = 3, k_density: int = 5) -> dict[str, float]:
    """The papers' formulas on full float64 distance matrices."""
    def distances(a, b):
        return np.linalg.norm(a[:, None] - b[None], axis=-1)

    real_sorted, fake_sorted, across = np.sort(distances(real, real), 1), np.sort(distances(fake, fake), 1), \
        distances(real, fake)
    real_radius, density_radius, fake_radius = real_sorted[:, k], real_sorted[:, k_density], fake_sorted[:, k]
    return {"precision": (across <= real_radius[:, None]).any(0).mean(),
            "recall": (across <= fake_radius[None]).any(1).mean(),
            "density": (across < density_radius[:, None]).sum(0).mean() / k_density,
            "coverage": (across.min(1) < density_radius).mean()}


def test_variety_matches_the_definitions_whatever_the_block_size():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(60, 4)), rng.normal(0.4, 1.2, size=(50, 4))
    expected = by_definition(real, fake)
    assert 0 < min(expected.values()) and max(expected.values()) < 1  # a case where every figure says something
    for batch_size in (7, 1000):
        assert variety(real, fake, batch_size=batch_size) == pytest.approx(expected, abs=1e-9)


def test_identical_sets_score_one():
    points = np.random.default_rng(1).normal(size=(300, 8))
    scores = variety(points, points, batch_size=64)
    assert list(scores) == list(VARIETY_KEYS)
    assert scores["precision"] == scores["recall"] == scores["coverage"] == 1.0
    # Each real ball holds its own centre and its k - 1 nearest neighbours: density k / k.
    assert scores["density"] == pytest.approx(1.0, abs=0.01)


def test_disjoint_clusters_score_zero():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(200, 8)), rng.normal(100.0, 1.0, size=(200, 8))
    assert variety(real, fake) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_a_few_repeated_samples_are_realistic_but_cover_little():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(500, 8))
    # 500 samples that are 5 typical points repeated: their k-NN balls shrink to nothing.
    replay = np.repeat(rng.normal(scale=0.3, size=(5, 8)), 100, axis=0)
    scores = variety(real, replay)
    assert scores["precision"] == 1.0 and scores["recall"] == 0.0
    assert scores["coverage"] < 0.1


def test_too_few_points_are_refused():
    with pytest.raises(ValueError, match="more than 5 samples"):
        variety(np.zeros((5, 2)), np.zeros((50, 2)))


def test_within_class_sees_samples_of_the_wrong_class():
    """Samples asked for class k that show class k + 1: realistic and varied overall, nothing within a class."""
    rng = np.random.default_rng(4)
    centres = rng.normal(0, 20, size=(3, 8))
    real_labels, fake_labels = torch.arange(300) % 3, torch.arange(300) % 3
    real = torch.from_numpy(centres[real_labels] + rng.normal(size=(300, 8)))
    faithful = torch.from_numpy(centres[fake_labels] + rng.normal(size=(300, 8)))
    shifted = torch.from_numpy(centres[(fake_labels + 1) % 3] + rng.normal(size=(300, 8)))

    good = variety_within_class(real, real_labels, faithful, fake_labels)
    bad = variety_within_class(real, real_labels, shifted, fake_labels)
    assert variety(real, shifted)["recall"] > 0.8 and bad["recall_within_class"] == 0.0
    assert good["recall_within_class"] > 0.8 and good["coverage_within_class"] > 0.8
    for key in VARIETY_KEYS:
        per_class = [good[f"{key}_class_{k}"] for k in range(3)]
        assert good[f"{key}_within_class"] == pytest.approx(np.mean(per_class))
        assert bad[f"{key}_within_class"] == 0.0


def test_a_sweep_can_optimize_variety():
    from helpers import REPO_ROOT
    from pipeline.config import ConfigError, apply_overrides, read_params, validate

    raw = read_params(REPO_ROOT / "params.yaml")
    for metric in ("precision", "recall", "density", "coverage", "recall_within_class"):
        assert validate(apply_overrides(raw, {"sweep.metric": metric})).sweep.mode == "max"
    # Only a conditional model asks for each class: a within-class metric needs one in every trial.
    unconditional = {"model.conditional": "none", "sweep.metric": "coverage_within_class"}
    with pytest.raises(ConfigError, match="sweep.metric coverage_within_class needs a conditional model"):
        validate(apply_overrides(raw, unconditional))
