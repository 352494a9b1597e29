"""The evaluator: a small classifier trained on the real data, the eye every quality metric looks through.

Inception weights need the internet and Inception is the wrong eye for 28x28
digits, so each dataset gets its own ``EvaluatorNet``. ``gan.metrics`` measures
samples in its 128-d penultimate feature space and on its softmax.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gan.data import to_unit_range


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


def as_image_tensor(images, device: torch.device | str | None = None) -> torch.Tensor:
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


def embed(evaluator: EvaluatorNet, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits of [-1, 1] image batches, concatenated (no grad, eval mode)."""
    evaluator.eval()
    features, logits = [], []
    with torch.no_grad():
        for batch in batches:
            batch_features, batch_logits = evaluator.features_and_logits(batch)
            features.append(batch_features)
            logits.append(batch_logits)
    return torch.cat(features), torch.cat(logits)


def embed_uint8(evaluator: EvaluatorNet, images: torch.Tensor, batch_size: int = 1000):
    return embed(evaluator, (to_unit_range(chunk) for chunk in images.split(batch_size)))


def accuracy(evaluator: EvaluatorNet, images_uint8, labels, batch_size: int = 1000) -> float:
    device = next(evaluator.parameters()).device
    _, logits = embed_uint8(evaluator, as_image_tensor(images_uint8, device), batch_size)
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
    x_train, x_test = as_image_tensor(x_train, device), as_image_tensor(x_test, device)
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
