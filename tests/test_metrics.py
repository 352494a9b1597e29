"""gan.metrics: closed forms for the statistics, and the metrics' behaviour on a
small evaluator trained on synthetic class patterns (no real data needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from gan.data import to_unit_range
from gan.evaluator_net import EvaluatorNet, load_evaluator, random_shift, save_evaluator, train_evaluator
from gan.metrics import (
    METRIC_KEYS, ClassReplaySampler, ReplaySampler, class_coverage, class_kl, evaluate, fid, frechet_distance,
    inception_score, kid, noise_sampler, real_reference, reference_scores, variety,
)

NUM_CLASSES = 10


def blob_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 28x28 images: a bright Gaussian blob at a class-specific place (2x5 grid),
    with jittered centre, width and brightness, over a dim noisy background."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % NUM_CLASSES)
    centre_y = 7.0 + 14.0 * (labels // 5) + rng.uniform(-1.0, 1.0, n)
    centre_x = 3.5 + 5.25 * (labels % 5) + rng.uniform(-1.0, 1.0, n)
    width = rng.uniform(1.5, 2.5, n)
    brightness = rng.uniform(180, 255, n)
    yy, xx = np.mgrid[0:28, 0:28]
    blobs = brightness[:, None, None] * np.exp(
        -((yy - centre_y[:, None, None]) ** 2 + (xx - centre_x[:, None, None]) ** 2) / (2 * width[:, None, None] ** 2))
    images = blobs + rng.uniform(0, 40, (n, 28, 28))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors here are tiny: a second intra-op thread only adds overhead, and stalls
    badly when other jobs keep the CPUs busy (minutes instead of seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    """A tiny evaluator (a few seconds of CPU) and a held-out synthetic split."""
    x_train, y_train = blob_images(1000, seed=1)
    x_test, y_test = blob_images(1000, seed=2)
    # No shift augmentation: the blobs sit ~5 px apart, a 2 px shift would blur the classes.
    net, stats = train_evaluator(x_train, y_train, x_test, y_test, epochs=2, batch_size=50, max_shift=0)
    return net, stats, (x_train, y_train), (x_test, y_test)


def features_of(net: EvaluatorNet, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.eval().features(images)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = 4
    taps = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * sigma ** 2))
    taps = taps / taps.sum()
    padded = F.pad(images, (radius,) * 4, mode="replicate")
    rows = F.conv2d(padded, taps.view(1, 1, 1, -1))
    return F.conv2d(rows, taps.view(1, 1, -1, 1))


# --------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, abs=1e-6)


def test_frechet_distance_matches_closed_form_for_commuting_covariances():
    # S1 = Q D1 Q^T and S2 = Q D2 Q^T share eigenvectors, so tr sqrt(S1 S2) = sum sqrt(d1 d2).
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    d1, d2 = rng.uniform(0.1, 4.0, 6), rng.uniform(0.1, 4.0, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    got = frechet_distance(mu1, q @ np.diag(d1) @ q.T, mu2, q @ np.diag(d2) @ q.T)
    assert got == pytest.approx(expected, abs=1e-6)


def test_frechet_distance_matches_scipy_sqrtm_in_the_general_case():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    expected = np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert frechet_distance(np.zeros(5), s1, np.zeros(5), s2) == pytest.approx(expected, abs=1e-6)


def test_frechet_distance_is_zero_for_identical_singular_gaussians():
    rng = np.random.default_rng(3)
    low_rank = rng.normal(size=(20, 3))
    sigma = low_rank @ low_rank.T  # rank 3 of 20: where a plain sqrtm(S1 @ S2) goes complex
    mu = rng.normal(size=20)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


# --------------------------------------------------------------------------- KID, IS, classes, PR


def test_kid_matches_brute_force_unbiased_mmd():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(12, 3)), rng.normal(0.5, 1.0, size=(12, 3))

    def k(u, v):
        return (u @ v / 3 + 1) ** 3

    m = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    across = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    mean, std = kid(x, y, subsets=3, subset_size=m)  # whole sets: every subset is the same estimate
    assert mean == pytest.approx(within - 2 * across, rel=1e-5)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(1000, 32)), rng.normal(size=(1000, 32))
    shifted = rng.normal(0.3, 1.0, size=(1000, 32))
    same_mean, same_std = kid(a, b, subsets=20, subset_size=500)
    diff_mean, diff_std = kid(a, shifted, subsets=20, subset_size=500)
    assert abs(same_mean) < 0.05 * diff_mean
    assert diff_mean > 10 * diff_std


def test_inception_score_bounds():
    one_hot_uniform = F.one_hot(torch.arange(1000) % NUM_CLASSES, NUM_CLASSES).double()
    assert inception_score(one_hot_uniform, splits=10) == pytest.approx((10.0, 0.0), abs=1e-9)
    constant = F.one_hot(torch.full((1000,), 3), NUM_CLASSES).double()
    assert inception_score(constant)[0] == pytest.approx(1.0, abs=1e-9)
    unsure = torch.full((1000, NUM_CLASSES), 1 / NUM_CLASSES)  # uniform softmax: no information
    assert inception_score(unsure)[0] == pytest.approx(1.0, abs=1e-9)


def test_class_coverage_counts_classes_over_the_share_threshold():
    predictions = np.repeat(np.arange(NUM_CLASSES), [500, 200, 100, 100, 50, 30, 10, 6, 4, 0])
    assert class_coverage(predictions, NUM_CLASSES, min_share=0.01) == pytest.approx(0.7)  # 10/1000 counts
    assert class_coverage(predictions, NUM_CLASSES, min_share=0.0) == pytest.approx(1.0)


def test_class_kl_values_and_direction():
    uniform_labels = np.arange(1000) % NUM_CLASSES
    all_class_0 = np.zeros(500, dtype=np.int64)
    assert class_kl(all_class_0, uniform_labels, NUM_CLASSES) == pytest.approx(math.log(10), abs=1e-4)
    assert class_kl(uniform_labels, uniform_labels, NUM_CLASSES) == pytest.approx(0.0, abs=1e-9)
    # A histogram (counts or shares) is accepted in place of the labels.
    counts = np.bincount(uniform_labels, minlength=NUM_CLASSES).astype(np.float64)
    assert class_kl(all_class_0, counts, NUM_CLASSES) == class_kl(all_class_0, uniform_labels, NUM_CLASSES)
    # KL(generated || real), not the reverse: covering classes the real data lacks costs ~ log(1/eps).
    real_only_0_to_4 = np.arange(1000) % 5
    assert class_kl(uniform_labels, real_only_0_to_4, NUM_CLASSES) > 5.0
    assert class_kl(real_only_0_to_4, uniform_labels, NUM_CLASSES) == pytest.approx(math.log(2), abs=1e-4)


def clusters(n: int, modes: list[int], rng: np.random.Generator) -> np.ndarray:
    centres = np.random.default_rng(123).normal(0, 6, size=(10, 4))
    return centres[rng.choice(modes, size=n)] + rng.normal(size=(n, 4))


def test_variety_same_distribution_and_dropped_modes():
    rng = np.random.default_rng(6)
    real = clusters(1000, list(range(10)), rng)
    same = clusters(1000, list(range(10)), rng)
    half_the_modes = clusters(1000, list(range(5)), rng)
    same_scores = variety(real, same, k=3)
    assert same_scores["precision"] > 0.85 and same_scores["recall"] > 0.85
    dropped = variety(real, half_the_modes, k=3)
    assert dropped["precision"] > 0.85
    # Half the real samples lie in modes the fakes never visit.
    assert 0.35 < dropped["recall"] < 0.55 and dropped["recall"] < 0.6 * same_scores["recall"]
    assert 0.35 < dropped["coverage"] < 0.55 < 0.85 < same_scores["coverage"]


# --------------------------------------------------------------------------- the evaluator


def test_random_shift_moves_each_image_by_at_most_max_shift():
    images = torch.full((64, 1, 28, 28), -1.0)
    images[:, :, 13, 14] = 1.0  # one lit pixel each
    shifted = random_shift(images, 2, torch.Generator().manual_seed(0))
    lit = (shifted == 1.0).nonzero()[:, 2:]  # (row, col) of the lit pixel of each image
    assert len(lit) == 64 and (shifted[shifted != 1.0] == -1.0).all()
    assert (lit[:, 0] - 13).abs().max() == 2 and (lit[:, 1] - 14).abs().max() == 2
    assert torch.equal(random_shift(images, 0, torch.Generator()), images)


def test_evaluator_learns_the_synthetic_classes(trained):
    _, stats, _, _ = trained
    assert stats["test_accuracy"] >= 0.97
    assert set(stats) >= {"test_accuracy", "train_accuracy", "train_seconds"}


def test_train_evaluator_is_deterministic_for_a_seed():
    x, y = blob_images(200, seed=3)

    def weights(seed):
        net, _ = train_evaluator(x, y, x[:50], y[:50], epochs=1, batch_size=50, seed=seed)
        return net.state_dict()

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["head.1.weight"], other["head.1.weight"])


def test_save_load_round_trip_gives_identical_logits(trained, tmp_path):
    net, _, _, (x_test, _) = trained
    path = tmp_path / "evaluator" / "net.pt"
    save_evaluator(net, path, {"dataset": "blobs", "test_accuracy": 0.99})
    loaded = load_evaluator(path, "cpu")
    images = to_unit_range(torch.from_numpy(x_test[:100])).unsqueeze(1)
    with torch.no_grad():
        assert torch.equal(net.eval()(images), loaded(images))
    assert torch.load(path, weights_only=True)["meta"] == {"dataset": "blobs", "test_accuracy": 0.99}


# --------------------------------------------------------------------------- metrics on evaluator features


def test_fid_of_halves_is_near_zero_and_fid_to_noise_large(trained):
    net, _, (x_train, _), _ = trained
    real = features_of(net, to_unit_range(torch.from_numpy(x_train)).unsqueeze(1))
    noise = features_of(net, noise_sampler((1, 28, 28), seed=0)(500))
    fid_halves = fid(real[:500], real[500:])
    fid_noise = fid(real[:500], noise)
    assert fid_halves < 0.05 * fid_noise


@pytest.mark.parametrize("degrade, levels", [
    (gaussian_blur, [0.6, 1.0, 1.5, 2.5]),
    (lambda x, std: (x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1),
     [0.1, 0.2, 0.4, 0.8]),
], ids=["blur", "additive_noise"])
def test_fid_grows_with_degradation(trained, degrade, levels):
    net, _, (x_train, _), (x_test, _) = trained
    reference = features_of(net, to_unit_range(torch.from_numpy(x_test)).unsqueeze(1))
    images = to_unit_range(torch.from_numpy(x_train)).unsqueeze(1)
    scores = [fid(reference, features_of(net, images))]
    scores += [fid(reference, features_of(net, degrade(images, level))) for level in levels]
    assert all(lower < higher for lower, higher in zip(scores, scores[1:])), scores


def test_evaluate_replaying_the_reference_itself_is_perfect(trained):
    net, _, _, (x_test, y_test) = trained
    reference = real_reference(net, x_test, y_test)
    scores = evaluate(ReplaySampler(x_test), net, reference, n=len(x_test), batch_size=300)
    assert tuple(scores) == METRIC_KEYS
    assert abs(scores["fid"]) < 1e-6  # the same images in another order
    assert scores["precision"] == 1.0 and scores["recall"] == 1.0 and scores["coverage"] == 1.0
    assert scores["class_coverage"] == 1.0 and scores["class_kl"] < 0.01


@pytest.fixture(scope="module")
def yardstick(trained):
    net, _, (x_train, y_train), (x_test, y_test) = trained
    return reference_scores(net, x_train, x_test, y_test, n=500, real_train_labels=y_train)


def test_reference_scores_floor_below_ceilings(yardstick):
    floor, noise, single = yardstick["real_vs_real"], yardstick["noise"], yardstick["single_class"]
    assert floor["class_coverage"] == 1.0 and floor["class_kl"] < 0.02
    assert single["class_coverage"] == pytest.approx(0.1)
    assert single["class_kl"] == pytest.approx(math.log(10), abs=0.05)  # balanced test labels
    assert floor["fid"] < 0.05 * min(noise["fid"], single["fid"])
    assert floor["kid"] < 0.05 * min(noise["kid"], single["kid"])
    assert floor["recall"] > 0.7 and single["recall"] < 0.2
    assert floor["coverage"] > 0.8 and single["coverage"] < 0.2 and noise["coverage"] == noise["density"] == 0.0
    # The floor has the within-class figures too: train images of class k replayed when k is asked for.
    assert floor["cond_accuracy"] > 0.97 and floor["recall_within_class"] > 0.7 and "fid_class_9" in floor
    # A 2-epoch evaluator's softmax is soft, so even real images score well below 10.
    assert floor["inception_score"] > 4.0 and single["inception_score"] < 1.2


def test_evaluate_rejects_samples_of_the_wrong_shape(trained):
    net, _, _, (x_test, y_test) = trained
    reference = real_reference(net, x_test[:100], y_test[:100])
    with pytest.raises(ValueError, match="expected"):
        evaluate(lambda n: torch.zeros(n, 1, 32, 32), net, reference, n=10)


def few_per_class(images: np.ndarray, labels: np.ndarray, count: int) -> ClassReplaySampler:
    chosen = np.concatenate([np.flatnonzero(labels == k)[:count] for k in range(NUM_CLASSES)])
    return ClassReplaySampler(images[chosen], labels[chosen])


def test_replaying_a_few_images_per_class_fools_fid_and_accuracy_not_recall(trained, yardstick):
    net, _, (x_train, y_train), (x_test, y_test) = trained
    reference = real_reference(net, x_test, y_test)
    scores = evaluate(few_per_class(x_train, y_train, 5), net, reference, n=500, conditional=True)
    floor, noise, single = yardstick["real_vs_real"], yardstick["noise"], yardstick["single_class"]
    assert scores["fid"] < 0.02 * min(noise["fid"], single["fid"]) and scores["cond_accuracy"] > 0.97
    assert scores["precision"] > 0.9 and scores["precision_within_class"] > 0.9
    # Each sample is one of 50 images repeated 10 times: its k-NN ball is a point.
    assert scores["recall"] < 0.02 and scores["recall_within_class"] < 0.02
    assert scores["coverage"] < 0.5 * floor["coverage"] and scores["coverage_within_class"] < 0.5 * floor["coverage"]


def test_other_real_images_score_the_real_vs_real_figures(trained, yardstick):
    """A third real split, asked for by class, stands for a perfect generator: it lands on the floor."""
    net, _, _, (x_test, y_test) = trained
    x_other, y_other = blob_images(1000, seed=3)
    reference = real_reference(net, x_test, y_test)
    scores = evaluate(ClassReplaySampler(x_other, y_other), net, reference, n=500, conditional=True)
    floor = yardstick["real_vs_real"]
    for key in ("precision", "recall", "density", "coverage"):
        assert scores[key] == pytest.approx(floor[key], abs=0.1), key
        assert scores[f"{key}_within_class"] == pytest.approx(floor[f"{key}_within_class"], abs=0.1), key
