"""Sample quality, measured by a small classifier trained on the real data.

Inception weights need the internet and Inception is the wrong eye for 28x28
digits, so each dataset gets its own ``EvaluatorNet``; FID, KID, precision,
recall, density and coverage (``gan.variety``) live in its 128-d penultimate
feature space, and the classifier Inception Score, class coverage and class KL
on its softmax.

A model's figures only mean something next to ``reference_scores``: real train
images scored against real test images are the floor (no generator can beat
sampling the data itself), uniform noise and a single-class replay are ceilings.

Pure PyTorch + NumPy; the statistics that need it are computed in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from gan.data import to_unit_range
from gan.evaluator_net import EvaluatorNet, as_image_tensor, embed, embed_uint8
from gan.variety import VARIETY_KEYS, variety, variety_within_class

Sampler = Callable[..., torch.Tensor]  # n -> (n, C, H, W) images in [-1, 1]; conditional: (n, labels=...)

METRIC_KEYS = ("fid", "kid", "kid_std", "inception_score", "inception_score_std",
               "class_coverage", "class_kl", *VARIETY_KEYS)


# --------------------------------------------------------------------------- statistics


def _psd_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric PSD matrix, eigenvalues at round-off level set to 0.

    Their square roots (~1e-8 each) would otherwise add up to a visible error
    when the covariances are singular (fewer samples than dimensions).
    """
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    round_off = max(eigenvalues.max(), 0.0) * len(eigenvalues) * np.finfo(np.float64).eps
    return np.where(eigenvalues > round_off, eigenvalues, 0.0), eigenvectors


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2):

    ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2).

    tr sqrt(S1 S2) is taken as tr sqrt(sqrt(S1) S2 sqrt(S1)) (similar matrices):
    that one is symmetric PSD, so ``eigh`` gives real, stable eigenvalues even
    when the covariances are singular, where ``sqrtm(S1 @ S2)`` can go complex.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    eigenvalues, eigenvectors = _psd_eigh(sigma1)
    sqrt_sigma1 = (eigenvectors * np.sqrt(eigenvalues)) @ eigenvectors.T
    trace_sqrt_product = np.sqrt(_psd_eigh(sqrt_sigma1 @ sigma2 @ sqrt_sigma1)[0]).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product)


def mean_and_covariance(features) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean (d,) and sample covariance (d, d) of (n, d) features."""
    features = torch.as_tensor(features).detach().to("cpu", torch.float64).numpy()
    return features.mean(axis=0), np.cov(features, rowvar=False)


def fid(feats_a, feats_b) -> float:
    return frechet_distance(*mean_and_covariance(feats_a), *mean_and_covariance(feats_b))


def kid(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3.

    Averaged over ``subsets`` random subsets of ``subset_size`` from each set
    (capped at the smaller set); returns (mean, std over subsets). Unbiased, so
    it scatters around 0, slightly negative included, for equal distributions.
    """
    a = torch.as_tensor(feats_a).detach().float()
    b = torch.as_tensor(feats_b).detach().to(a.device, torch.float32)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    dim = a.shape[1]
    generator = torch.Generator().manual_seed(seed)
    one = torch.ones((), device=a.device)

    def kernel_sum(u: torch.Tensor, v: torch.Tensor, skip_diagonal: bool) -> torch.Tensor:
        # The kernel in float32 (10x faster than float64 on CPU), summed in float64.
        kernel = torch.addmm(one, u, v.T, alpha=1 / dim).pow_(3)
        total = kernel.sum(dtype=torch.float64)
        return total - kernel.diagonal().sum(dtype=torch.float64) if skip_diagonal else total

    estimates = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=generator)[:m].to(a.device)]
        y = b[torch.randperm(len(b), generator=generator)[:m].to(b.device)]
        # Leaving k(x_i, x_i) out of the within-set means is what makes it unbiased.
        within = (kernel_sum(x, x, True) + kernel_sum(y, y, True)) / (m * (m - 1))
        estimates.append(within - 2 * kernel_sum(x, y, False) / m ** 2)
    estimates = torch.stack(estimates)
    return float(estimates.mean()), float(estimates.std(correction=0))


def inception_score(probs, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split of the (n, classes) probabilities: (mean, std).

    Between 1 (every sample the same prediction) and the number of classes
    (confident predictions, classes equally used).
    """
    probs = torch.as_tensor(probs).detach().double()
    scores = []
    for chunk in probs.tensor_split(splits):
        marginal = chunk.mean(0, keepdim=True)
        # xlogy: 0 * log 0 = 0 for classes a sample (or the whole split) never predicts.
        kl = (torch.special.xlogy(chunk, chunk) - torch.special.xlogy(chunk, marginal)).sum(1)
        scores.append(kl.mean().exp())
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(correction=0))


def class_histogram(classes, num_classes: int) -> torch.Tensor:
    """Share of each class among integer class labels, float64, summing to 1."""
    counts = torch.bincount(torch.as_tensor(classes).detach().long().flatten().cpu(), minlength=num_classes)
    if len(counts) > num_classes:
        raise ValueError(f"class {len(counts) - 1} out of range for {num_classes} classes")
    return counts.double() / counts.sum()


def class_coverage(pred_classes, num_classes: int, min_share: float = 0.01) -> float:
    """Fraction of the classes that receive at least ``min_share`` of the samples."""
    return float((class_histogram(pred_classes, num_classes) >= min_share).double().mean())


def class_kl(pred_classes, real_labels_or_hist, num_classes: int, eps: float = 1e-6) -> float:
    """KL(generated class histogram || real class histogram), in nats.

    The direction asks "how unlike the real class mix is what the generator
    makes": collapse onto one of ten balanced classes scores log 10 = 2.30;
    classes the generator drops lower its score only through the renormalized
    rest (``class_coverage`` reports them directly). ``eps`` is added to the
    real histogram so a class missing from the real split stays finite.
    ``real_labels_or_hist``: integer labels, or a float histogram (counts or shares).
    """
    generated = class_histogram(pred_classes, num_classes)
    real = torch.as_tensor(real_labels_or_hist).detach().cpu()
    real = real.double() if real.is_floating_point() else class_histogram(real, num_classes)
    if real.shape != (num_classes,):
        raise ValueError(f"real histogram has shape {tuple(real.shape)}, expected ({num_classes},)")
    real = (real / real.sum() + eps) / (1 + num_classes * eps)
    return float((torch.special.xlogy(generated, generated) - torch.special.xlogy(generated, real)).sum())


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class RealReference:
    """What ``evaluate`` compares against, computed once per evaluator and real split."""

    features: torch.Tensor  # (N, 128) float32, on the device it was computed on
    mu: np.ndarray  # (128,) float64
    sigma: np.ndarray  # (128, 128) float64
    class_histogram: np.ndarray  # (classes,) float64 shares of the real labels
    image_shape: tuple[int, int, int]  # (C, H, W) the samplers must produce
    labels: torch.Tensor | None = None  # (N,) the real labels, beside ``features``: per-class FID


def real_reference(evaluator: EvaluatorNet, real_test_images_uint8, real_test_labels,
                   device: torch.device | str = "cpu", batch_size: int = 1000) -> RealReference:
    evaluator.to(device)
    images = as_image_tensor(real_test_images_uint8, device)
    features, _ = embed_uint8(evaluator, images, batch_size)
    mu, sigma = mean_and_covariance(features)
    histogram = class_histogram(real_test_labels, evaluator.num_classes).numpy()
    labels = torch.as_tensor(real_test_labels, device=features.device).long()
    return RealReference(features, mu, sigma, histogram, tuple(images.shape[1:]), labels)


def _sampled_batches(sampler: Sampler, n: int, batch_size: int, shape: tuple, device,
                     labels: torch.Tensor | None = None) -> Iterable[torch.Tensor]:
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        images = sampler(size) if labels is None else sampler(size, labels=labels[start:start + size])
        if tuple(images.shape) != (size, *shape):
            raise ValueError(f"sampler({size}) gave shape {tuple(images.shape)}, expected {(size, *shape)}")
        yield images.to(device, torch.float32)


def _real_order(n: int, seed: int, device) -> torch.Tensor:
    """A fixed (``seed``) shuffle of the reals, so successive evaluations compare the same subsets."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)


def _embed_samples(sampler: Sampler, evaluator: EvaluatorNet, reference: RealReference, n: int, batch_size: int,
                   device, conditional: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(features, logits, asked labels or None) of ``n`` samples; conditional: the classes in turn (balanced)."""
    labels = torch.arange(n, device=device) % evaluator.num_classes if conditional else None
    batches = _sampled_batches(sampler, n, batch_size, reference.image_shape, device, labels)
    features, logits = embed(evaluator, batches)
    return features, logits, labels


@torch.no_grad()
def evaluate(sampler: Sampler, evaluator: EvaluatorNet, reference: RealReference, n: int = 10_000,
             batch_size: int = 1000, device: torch.device | str | None = None, seed: int = 0,
             conditional: bool = False) -> dict[str, float]:
    """Every metric of ``n`` samples against the real reference, as a dict of floats.

    ``sampler(k)`` returns k images (k, C, H, W) in [-1, 1] on any device; it is
    called in batches of ``batch_size`` (put the generator in eval mode yourself
    if it should be). FID, KID, IS, coverage and KL use all ``n`` samples and
    the whole reference; precision, recall, density and coverage compare
    min(n, N_real) of each, with a fixed (``seed``) subset of the reals so
    successive evaluations are comparable. Keys: see ``METRIC_KEYS``.

    ``conditional``: ``sampler(k, labels=...)`` draws the given classes; the n samples
    are the classes in turn (balanced), and ``conditional_scores`` are added.
    """
    device = torch.device(device) if device is not None else reference.features.device
    evaluator.to(device)
    fake_features, fake_logits, labels = _embed_samples(sampler, evaluator, reference, n, batch_size, device,
                                                        conditional)
    real_features = reference.features.to(device)

    probs = torch.softmax(fake_logits.double(), dim=1)
    predicted = probs.argmax(1)
    kid_mean, kid_std = kid(fake_features, real_features, seed=seed)
    score_mean, score_std = inception_score(probs)
    size = min(n, len(real_features))
    real_subset = real_features[_real_order(len(real_features), seed, device)[:size]]
    extra = conditional_scores(fake_features, predicted, labels, reference, seed) if conditional else {}
    return {
        "fid": frechet_distance(*mean_and_covariance(fake_features), reference.mu, reference.sigma),
        "kid": kid_mean,
        "kid_std": kid_std,
        "inception_score": score_mean,
        "inception_score_std": score_std,
        "class_coverage": class_coverage(predicted, evaluator.num_classes),
        "class_kl": class_kl(predicted, reference.class_histogram, evaluator.num_classes),
        **variety(real_subset, fake_features[:size]),
        **extra,
    }


def conditional_scores(fake_features: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor,
                       reference: RealReference, seed: int = 0) -> dict[str, float]:
    """How well samples asked for class k are class k, and how much of class k they draw.

    ``cond_accuracy`` (the share the evaluator assigns to the class they were
    drawn for) overall and per class (``cond_accuracy_<k>``); ``fid_class_<k>``,
    the FID of class k's samples against the real test images of class k; and
    ``variety_within_class`` of the same (precision, recall, density, coverage
    per class and their means), on a fixed (``seed``) shuffle of the reals.
    """
    if reference.labels is None:
        raise ValueError("conditional scores need a reference with the real labels (real_reference gives them)")
    hits = predicted.to(labels.device) == labels
    scores = {"cond_accuracy": float(hits.double().mean())}
    real_labels = reference.labels.to(reference.features.device)
    for k in range(int(labels.max()) + 1):
        mine, real = labels == k, reference.features[real_labels == k]
        scores[f"cond_accuracy_{k}"] = float(hits[mine].double().mean())
        if len(real) > 1 and int(mine.sum()) > 1:
            scores[f"fid_class_{k}"] = fid(fake_features[mine], real)
    order = _real_order(len(real_labels), seed, real_labels.device)
    scores.update(variety_within_class(reference.features[order], real_labels[order],
                                       fake_features.to(reference.features.device), labels.to(real_labels.device)))
    return scores


class ReplaySampler:
    """A 'generator' that returns real uint8 images as [-1, 1] floats, in random order.

    Draws without repetition until the set is used up, then reshuffles.
    """

    def __init__(self, images_uint8, seed: int = 0):
        self.images = as_image_tensor(images_uint8)
        self.generator = torch.Generator(device=self.images.device).manual_seed(seed)
        self.queue = torch.empty(0, dtype=torch.long, device=self.images.device)

    def __call__(self, n: int) -> torch.Tensor:
        while len(self.queue) < n:
            fresh = torch.randperm(len(self.images), generator=self.generator, device=self.images.device)
            self.queue = torch.cat([self.queue, fresh])
        index, self.queue = self.queue[:n], self.queue[n:]
        return to_unit_range(self.images[index])


class ClassReplaySampler:
    """A conditional 'generator' that replays real images of the classes asked for (``ReplaySampler`` per class)."""

    def __init__(self, images_uint8, labels, seed: int = 0):
        images = as_image_tensor(images_uint8)
        labels = torch.as_tensor(labels, device=images.device)
        self.image_shape = tuple(images.shape[1:])
        self.classes = [ReplaySampler(images[labels == k], seed + k) for k in range(int(labels.max()) + 1)]

    def __call__(self, n: int, labels: torch.Tensor) -> torch.Tensor:
        images = torch.empty((n, *self.image_shape), device=labels.device)
        for k, replay in enumerate(self.classes):
            asked = labels == k
            images[asked] = replay(int(asked.sum())).to(labels.device)
        return images


def noise_sampler(shape: tuple[int, ...], seed: int = 0, device: torch.device | str = "cpu") -> Sampler:
    """Uniform noise images in [-1, 1]: the 'knows nothing' ceiling."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return lambda n: torch.rand((n, *shape), generator=generator, device=device) * 2 - 1


def reference_scores(evaluator: EvaluatorNet, real_train_uint8, real_test_uint8, real_test_labels,
                     n: int = 10_000, device: torch.device | str = "cpu", *, real_train_labels,
                     batch_size: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """``evaluate`` of three stand-in generators against the real test split.

    - "real_vs_real": replays random real train images, the floor; with the
      ``conditional_scores`` of replaying the train images of each class asked for
      (accuracy, FID and variety within a class);
    - "noise": uniform noise in [-1, 1], the ceiling of a generator that learned nothing;
    - "single_class": replays only the train images of class 0 (``real_train_labels``
      selects them), the ceiling of total mode collapse onto perfect images.
    """
    reference = real_reference(evaluator, real_test_uint8, real_test_labels, device, batch_size)
    train = as_image_tensor(real_train_uint8, device)
    train_labels = torch.as_tensor(real_train_labels, device=device)
    samplers = {
        "real_vs_real": ReplaySampler(train, seed),
        "noise": noise_sampler(reference.image_shape, seed, device),
        "single_class": ReplaySampler(train[train_labels == 0], seed),
    }
    scores = {name: evaluate(sampler, evaluator, reference, n=n, batch_size=batch_size, device=device, seed=seed)
              for name, sampler in samplers.items()}
    with torch.no_grad():
        features, logits, labels = _embed_samples(ClassReplaySampler(train, train_labels, seed), evaluator,
                                                  reference, n, batch_size, device, conditional=True)
    scores["real_vs_real"].update(conditional_scores(features, logits.argmax(1), labels, reference, seed))
    return scores
