"""Sample quality, measured by a small classifier trained on the real data.

Inception weights need the internet and Inception is the wrong eye for 28x28
digits, so each dataset gets its own ``EvaluatorNet``; FID, KID, precision and
recall live in its 128-d penultimate feature space, and the classifier
Inception Score, class coverage and class KL on its softmax.

A model's figures only mean something next to ``reference_scores``: real train
images scored against real test images are the floor (no generator can beat
sampling the data itself), uniform noise and a single-class replay are ceilings.

Pure PyTorch + NumPy; the statistics that need it are computed in float64.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gan.data import to_unit_range

Sampler = Callable[[int], torch.Tensor]  # n -> (n, C, H, W) images in [-1, 1]

METRIC_KEYS = ("fid", "kid", "kid_std", "inception_score", "inception_score_std",
               "class_coverage", "class_kl", "precision", "recall")


# --------------------------------------------------------------------------- evaluator


class EvaluatorNet(nn.Module):
    """A LeNet-like classifier of (C, H, W) images in [-1, 1].

    Three conv-BN-ReLU-maxpool stages (28 -> 14 -> 7 -> 3), a 128-d embedding
    (the feature space of the distance metrics) and a dropout + linear head.
    Kept small on purpose (~4M multiply-adds an image): 8k MNIST images x 10
    epochs train in about a minute on one CPU core, 60k x 4 in a few minutes.
    """

    feature_dim = 128
    widths = (24, 48, 96)

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        side = image_size // 2 ** len(self.widths)
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for {len(self.widths)} poolings")
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size}
        self.num_classes = num_classes
        layers, channels = [], in_channels
        for width in self.widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.conv = nn.Sequential(*layers, nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(channels * side * side, self.feature_dim, bias=False),
                                   nn.BatchNorm1d(self.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(self.feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 128) penultimate activations."""
        return self.embed(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return features, self.head(features)


def _as_image_tensor(images, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, C, H, W), numpy or torch -> uint8 (N, C, H, W) tensor."""
    images = torch.as_tensor(images, device=device)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images (N,H,W) or (N,C,H,W), got {images.dtype} {tuple(images.shape)}")
    return images


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each [-1, 1] image by its own random whole-pixel offset, filling with background."""
    if max_shift == 0:
        return images
    n, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator, device=images.device)
    rows = torch.arange(height, device=images.device) + dy  # (n, H)
    cols = torch.arange(width, device=images.device) + dx  # (n, W)
    batch = torch.arange(n, device=images.device)[:, None, None]
    # Advanced indices on dims 0, 2, 3 around a slice put the channel dim last.
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _embed(evaluator: EvaluatorNet, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits of [-1, 1] image batches, concatenated (no grad, eval mode)."""
    evaluator.eval()
    features, logits = [], []
    with torch.no_grad():
        for batch in batches:
            batch_features, batch_logits = evaluator.features_and_logits(batch)
            features.append(batch_features)
            logits.append(batch_logits)
    return torch.cat(features), torch.cat(logits)


def _embed_uint8(evaluator: EvaluatorNet, images: torch.Tensor, batch_size: int = 1000):
    return _embed(evaluator, (to_unit_range(chunk) for chunk in images.split(batch_size)))


def accuracy(evaluator: EvaluatorNet, images_uint8, labels, batch_size: int = 1000) -> float:
    device = next(evaluator.parameters()).device
    _, logits = _embed_uint8(evaluator, _as_image_tensor(images_uint8, device), batch_size)
    labels = torch.as_tensor(labels, device=device)
    return float((logits.argmax(1) == labels).double().mean())


def train_evaluator(x_train, y_train, x_test, y_test, *, num_classes: int = 10, epochs: int = 4,
                    batch_size: int = 256, lr: float = 3e-3, max_shift: int = 2, seed: int = 0,
                    device: torch.device | str = "cpu",
                    progress: Callable[[int, dict], None] | None = None) -> tuple[EvaluatorNet, dict]:
    """Train an ``EvaluatorNet`` on uint8 images; return it (in eval mode) and its scores.

    Adam with a one-cycle schedule peaking at ``lr``; each batch is shifted by up
    to ``max_shift`` pixels (the augmentation that lifts an 8k-image MNIST split
    to ~99%; 0 turns it off). The data lives on ``device`` and is shuffled there
    with a generator of its own, so a seed gives the same network on the same
    device (bit for bit on CPU at a fixed thread count; cuDNN may pick
    non-deterministic kernels).
    ``progress(epoch, {"loss", "test_accuracy"})`` is called after each epoch.
    """
    device = torch.device(device)
    x_train, x_test = _as_image_tensor(x_train, device), _as_image_tensor(x_test, device)
    y_train = torch.as_tensor(y_train, dtype=torch.long, device=device)
    _, channels, height, width = x_train.shape
    if height != width:
        raise ValueError(f"square images expected, got {height}x{width}")

    torch.manual_seed(seed)  # initial weights and dropout masks
    net = EvaluatorNet(in_channels=channels, num_classes=num_classes, image_size=height).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)  # shuffles and shifts
    batch_size = min(batch_size, len(x_train))
    steps_per_epoch = len(x_train) // batch_size  # a full last batch only: BatchNorm needs > 1 sample
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)

    start = time.perf_counter()
    epoch_loss = float("nan")
    for epoch in range(1, epochs + 1):
        net.train()
        order = torch.randperm(len(x_train), device=device, generator=generator)
        loss_sum = torch.zeros((), device=device)
        for step in range(steps_per_epoch):
            index = order[step * batch_size:(step + 1) * batch_size]
            images = random_shift(to_unit_range(x_train[index]), max_shift, generator)
            loss = F.cross_entropy(net(images), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach()
        epoch_loss = float(loss_sum) / steps_per_epoch  # one device sync per epoch
        if progress is not None:
            progress(epoch, {"loss": epoch_loss, "test_accuracy": accuracy(net, x_test, y_test)})
    train_seconds = time.perf_counter() - start

    net.eval()
    return net, {
        "test_accuracy": accuracy(net, x_test, y_test),
        "train_accuracy": accuracy(net, x_train, y_train),
        "train_loss": epoch_loss,
        "train_seconds": train_seconds,
        "epochs": epochs,
    }


def save_evaluator(net: EvaluatorNet, path: str | Path, meta: dict) -> None:
    """Weights, constructor arguments and ``meta`` (plain values only, for weights_only loading)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "config": net.config, "meta": meta}, path)


def load_evaluator(path: str | Path, device: torch.device | str = "cpu") -> EvaluatorNet:
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    net = EvaluatorNet(**checkpoint["config"])
    net.load_state_dict(checkpoint["state_dict"])
    return net.to(device).eval()


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


def _knn_radii(points: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point (the point itself is the 1st)."""
    return torch.cat([torch.cdist(chunk, points).kthvalue(k + 1, dim=1).values
                      for chunk in points.split(batch_size)])


def _fraction_inside(queries: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of queries inside at least one ball (center, radius)."""
    inside = [(torch.cdist(chunk, centers) <= radii).any(1) for chunk in queries.split(batch_size)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real_feats, fake_feats, k: int = 3, batch_size: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of k-NN manifolds.

    Each set's manifold is the union of balls around its points reaching to the
    k-th nearest neighbour. Precision: share of fakes inside the real manifold
    (are samples realistic?); recall: share of reals inside the fake manifold
    (is the data's variety covered?). Distances in ``batch_size`` row blocks.
    """
    real = torch.as_tensor(real_feats).detach().float()
    fake = torch.as_tensor(fake_feats).detach().to(real.device, torch.float32)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    precision = _fraction_inside(fake, real, _knn_radii(real, k, batch_size), batch_size)
    recall = _fraction_inside(real, fake, _knn_radii(fake, k, batch_size), batch_size)
    return precision, recall


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class RealReference:
    """What ``evaluate`` compares against, computed once per evaluator and real split."""

    features: torch.Tensor  # (N, 128) float32, on the device it was computed on
    mu: np.ndarray  # (128,) float64
    sigma: np.ndarray  # (128, 128) float64
    class_histogram: np.ndarray  # (classes,) float64 shares of the real labels
    image_shape: tuple[int, int, int]  # (C, H, W) the samplers must produce


def real_reference(evaluator: EvaluatorNet, real_test_images_uint8, real_test_labels,
                   device: torch.device | str = "cpu", batch_size: int = 1000) -> RealReference:
    evaluator.to(device)
    images = _as_image_tensor(real_test_images_uint8, device)
    features, _ = _embed_uint8(evaluator, images, batch_size)
    mu, sigma = mean_and_covariance(features)
    histogram = class_histogram(real_test_labels, evaluator.num_classes).numpy()
    return RealReference(features, mu, sigma, histogram, tuple(images.shape[1:]))


def _sampled_batches(sampler: Sampler, n: int, batch_size: int, shape: tuple, device) -> Iterable[torch.Tensor]:
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        images = sampler(size)
        if tuple(images.shape) != (size, *shape):
            raise ValueError(f"sampler({size}) gave shape {tuple(images.shape)}, expected {(size, *shape)}")
        yield images.to(device, torch.float32)


@torch.no_grad()
def evaluate(sampler: Sampler, evaluator: EvaluatorNet, reference: RealReference, n: int = 10_000,
             batch_size: int = 1000, device: torch.device | str | None = None, seed: int = 0) -> dict[str, float]:
    """Every metric of ``n`` samples against the real reference, as a dict of floats.

    ``sampler(k)`` returns k images (k, C, H, W) in [-1, 1] on any device; it is
    called in batches of ``batch_size`` (put the generator in eval mode yourself
    if it should be). FID, KID, IS, coverage and KL use all ``n`` samples and
    the whole reference; precision/recall compare min(n, N_real) of each, with a
    fixed (``seed``) subset of the reals so successive evaluations are comparable.
    Keys: see ``METRIC_KEYS``.
    """
    device = torch.device(device) if device is not None else reference.features.device
    evaluator.to(device)
    fake_features, fake_logits = _embed(
        evaluator, _sampled_batches(sampler, n, batch_size, reference.image_shape, device))
    real_features = reference.features.to(device)

    probs = torch.softmax(fake_logits.double(), dim=1)
    predicted = probs.argmax(1)
    kid_mean, kid_std = kid(fake_features, real_features, seed=seed)
    score_mean, score_std = inception_score(probs)
    pr_size = min(n, len(real_features))
    real_subset = torch.randperm(len(real_features), generator=torch.Generator().manual_seed(seed))[:pr_size]
    precision, recall = precision_recall(real_features[real_subset.to(device)], fake_features[:pr_size])
    return {
        "fid": frechet_distance(*mean_and_covariance(fake_features), reference.mu, reference.sigma),
        "kid": kid_mean,
        "kid_std": kid_std,
        "inception_score": score_mean,
        "inception_score_std": score_std,
        "class_coverage": class_coverage(predicted, evaluator.num_classes),
        "class_kl": class_kl(predicted, reference.class_histogram, evaluator.num_classes),
        "precision": precision,
        "recall": recall,
    }


class ReplaySampler:
    """A 'generator' that returns real uint8 images as [-1, 1] floats, in random order.

    Draws without repetition until the set is used up, then reshuffles.
    """

    def __init__(self, images_uint8, seed: int = 0):
        self.images = _as_image_tensor(images_uint8)
        self.generator = torch.Generator(device=self.images.device).manual_seed(seed)
        self.queue = torch.empty(0, dtype=torch.long, device=self.images.device)

    def __call__(self, n: int) -> torch.Tensor:
        while len(self.queue) < n:
            fresh = torch.randperm(len(self.images), generator=self.generator, device=self.images.device)
            self.queue = torch.cat([self.queue, fresh])
        index, self.queue = self.queue[:n], self.queue[n:]
        return to_unit_range(self.images[index])


def noise_sampler(shape: tuple[int, ...], seed: int = 0, device: torch.device | str = "cpu") -> Sampler:
    """Uniform noise images in [-1, 1]: the 'knows nothing' ceiling."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return lambda n: torch.rand((n, *shape), generator=generator, device=device) * 2 - 1


def reference_scores(evaluator: EvaluatorNet, real_train_uint8, real_test_uint8, real_test_labels,
                     n: int = 10_000, device: torch.device | str = "cpu", *, real_train_labels,
                     batch_size: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """``evaluate`` of three stand-in generators against the real test split.

    - "real_vs_real": replays random real train images, the floor;
    - "noise": uniform noise in [-1, 1], the ceiling of a generator that learned nothing;
    - "single_class": replays only the train images of class 0 (``real_train_labels``
      selects them), the ceiling of total mode collapse onto perfect images.
    """
    reference = real_reference(evaluator, real_test_uint8, real_test_labels, device, batch_size)
    train = _as_image_tensor(real_train_uint8, device)
    class0 = train[torch.as_tensor(real_train_labels, device=device) == 0]
    samplers = {
        "real_vs_real": ReplaySampler(train, seed),
        "noise": noise_sampler(reference.image_shape, seed, device),
        "single_class": ReplaySampler(class0, seed),
    }
    return {name: evaluate(sampler, evaluator, reference, n=n, batch_size=batch_size, device=device, seed=seed)
            for name, sampler in samplers.items()}
