"""Class-conditional GANs: label embeddings, conditional BatchNorm and a projection discriminator.

``model.conditional`` picks how the class label enters both networks:

- ``concat`` (Mirza & Osindero 2014): G sees cat([z, embedding(y)]) (a learned
  ``label_embedding``-wide vector); D sees its input with the label joined: one-hot
  planes beside an image's channels, or the one-hot vector beside a flattened sample (MLP).
- ``projection`` (Miyato & Koyama 2018): G sees cat([z, embedding(y)]) as in
  ``concat`` and its BatchNorm layers become class-conditional (per-class gain and
  bias, as in BigGAN-deep); D's logit gains the inner product of a label embedding
  with D's penultimate features. An MLP G has no BatchNorm: there G is ``concat``'s.
- ``acgan`` (Odena et al. 2017): G is ``concat``'s; D does not see the label but
  predicts it: a class head beside the real/fake head on D's penultimate features.
  D learns to classify real images, and G to draw fakes that D classifies as asked
  (cross-entropies weighted by ``train.class_weight``: ``Conditioning.d_class_loss``
  and ``g_class_loss``).
- ``tacgan`` (Gong et al. 2019, TAC-GAN): ``acgan`` with a twin class head that learns
  the asked classes of G's fakes; G is also paid for what the twin cannot tell. AC-GAN's
  class term alone pulls each class toward the samples easiest to classify; the twin's
  term cancels that pull, so a class keeps its variety.

The wrappers keep the unconditional networks' building blocks, so every model of
``gan.models.MODELS`` that sees images can be conditioned. Labels are int64 class
indices on the models' device; drawing them is device work (``uniform_labels``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONDITIONAL = ("none", "concat", "projection", "acgan", "tacgan")
# G's label embedding (model.label_embedding wide) joins z. For concat, at 10 wide (one per class) the label was
# a tenth of the input and G learned to follow it slowly (cond accuracy ~0.35 after 300 MNIST updates); at 64,
# ~0.75. Wider follows the label better, narrower leaves z more room for variety (docs/conditional.md).


@dataclass(frozen=True)
class Conditioning:
    """What a (G, D) pair is, said once where it is built (``gan.models.build_models``) and read everywhere else:
    the training step, the graph, sampling, metrics, export and the CLI ask it, never the model's shape."""

    kind: str  # one of CONDITIONAL
    num_classes: int

    @property
    def labelled(self) -> bool:
        """G takes a class label beside z, and the batches carry labels."""
        return self.kind != "none"

    @property
    def classes(self) -> int:
        """The classes G can be asked for: 0 for an unconditional model."""
        return self.num_classes if self.labelled else 0

    @property
    def class_head(self) -> bool:
        """D predicts the class too (AC-GAN, TAC-GAN): it returns (real/fake logits, class logits)."""
        return self.kind in ("acgan", "tacgan")

    def split_logits(self, output: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
        """(real/fake logits, class logits or None) of D's output, in float32."""
        if self.class_head:
            return output[0].float(), output[1].float()
        return output.float(), None

    def d_class_loss(self, class_logits: Tensor, n: int, real_labels: Tensor, fake_labels: Tensor) -> Tensor:
        """D's class term; D's batch starts with n reals, then n fakes. The class head learns the reals' classes
        only (fakes would teach it G's mistakes); TAC-GAN's twin head learns the fakes' asked classes."""
        loss = F.cross_entropy(class_logits[:n, :self.num_classes], real_labels)
        if self.kind == "tacgan":
            loss = loss + F.cross_entropy(class_logits[n:2 * n, self.num_classes:], fake_labels)
        return loss

    def g_class_loss(self, class_logits: Tensor, n: int, fake_labels: Tensor) -> Tensor:
        """G's class term on D's batch of n reals then n fakes: draw what the class head calls the asked class;
        TAC-GAN: and what the twin head, which knows G's fakes, cannot tell apart."""
        fake = class_logits[n:]
        loss = F.cross_entropy(fake[:, :self.num_classes], fake_labels)
        if self.kind == "tacgan":
            loss = loss - F.cross_entropy(fake[:, self.num_classes:], fake_labels)
        return loss


UNCONDITIONAL = Conditioning("none", 0)


def conditioning_of(model: nn.Module) -> Conditioning:
    """How ``model`` (a G or D that ``build_models`` made) is conditioned; a hand-made model is unconditional."""
    return getattr(model, "conditioning", UNCONDITIONAL)


def uniform_labels(n: int, num_classes: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """n class indices drawn uniformly, on the device (no host sync, capturable)."""
    return torch.randint(num_classes, (n,), generator=generator, device=device)


def class_rows(num_classes: int, per_class: int, device: torch.device | str = "cpu") -> Tensor:
    """Labels of a grid with one row per class: 0 x per_class, 1 x per_class, ..."""
    return torch.arange(num_classes, device=device).repeat_interleave(per_class)


def label_args(labels: Tensor | None) -> tuple[Tensor, ...]:
    """The extra call arguments of a model: (labels,) for a conditional one, none for the rest."""
    return () if labels is None else (labels,)


def split_batch(batch) -> tuple[Tensor, Tensor | None]:
    """(images, labels) of a batch that is either an (images, labels) pair or images alone."""
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1]
    return batch, None


def split_batches(batches, conditional: bool) -> tuple[list[Tensor], list[Tensor] | None]:
    """Images and labels of several batches (labels None for an unconditional model, which ignores them)."""
    pairs = [split_batch(batch) for batch in batches]
    reals, labels = [images for images, _ in pairs], [y for _, y in pairs]
    if not conditional:
        return reals, None
    if any(y is None for y in labels):
        raise ValueError("a class-conditional model trains on (images, labels) batches; these have no labels")
    return reals, labels


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without its own affine, then a per-class gain and bias (BigGAN's class-conditional BN).

    Gains start near 1 (N(1, 0.02), the DCGAN init of BatchNorm scales) and biases at 0: close to
    plain BatchNorm, with the classes already apart.
    """

    def __init__(self, norm: nn.BatchNorm2d, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=False)
        self.gain = nn.Embedding(num_classes, norm.num_features)
        self.bias = nn.Embedding(num_classes, norm.num_features)
        nn.init.normal_(self.gain.weight, 1.0, 0.02)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        return self.norm(x) * self.gain(labels)[:, :, None, None] + self.bias(labels)[:, :, None, None]


class LabelledSequential(nn.Sequential):
    """A Sequential whose conditional BatchNorm layers also get the labels."""

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, labels) if isinstance(layer, ConditionalBatchNorm2d) else layer(x)
        return x


def with_conditional_batchnorm(net: nn.Sequential, num_classes: int) -> LabelledSequential:
    """``net`` with every BatchNorm2d replaced by a ``ConditionalBatchNorm2d``."""
    return LabelledSequential(*[ConditionalBatchNorm2d(layer, num_classes) if isinstance(layer, nn.BatchNorm2d)
                                else layer for layer in net])


def _check_labels(labels: Tensor | None, n: int) -> Tensor:
    if labels is None:
        raise ValueError("this model is class-conditional: pass the class labels")
    if labels.shape != (n,):
        raise ValueError(f"expected {n} labels of shape ({n},), got {tuple(labels.shape)}")
    return labels


class ConditionalGenerator(nn.Module):
    """G(z, y): a label embedding joins z; with ``projection`` the labels also feed conditional BN."""

    def __init__(self, net: nn.Module, latent_dim: int, shape: Sequence[int], num_classes: int,
                 embedding: nn.Embedding):
        super().__init__()
        self.net = net
        self.embedding = embedding
        self.latent_dim = latent_dim
        self.shape = tuple(shape)
        self.num_classes = num_classes

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        labels = _check_labels(labels, z.shape[0])
        z = torch.cat([z, self.embedding(labels).to(z.dtype)], 1)
        out = self.net(z, labels) if isinstance(self.net, LabelledSequential) else self.net(z)
        return out.reshape(z.shape[0], *self.shape)


class ConcatDiscriminator(nn.Module):
    """D(x, y) = D'(x with the one-hot label joined): as channel planes for images, as features for an MLP."""

    def __init__(self, net: nn.Module, num_classes: int, as_planes: bool):
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.as_planes = as_planes

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        labels = _check_labels(labels, x.shape[0])
        one_hot = F.one_hot(labels, self.num_classes).to(x.dtype)
        if self.as_planes:
            planes = one_hot[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
            return self.net(torch.cat([x, planes], 1)).reshape(-1)
        return self.net(torch.cat([x.flatten(1), one_hot], 1)).reshape(-1)


class _HeadedDiscriminator(nn.Module):
    """An unconditional D split at its last layer: ``body`` gives the penultimate features, ``head`` the logit."""

    def __init__(self, body: nn.Module, head: nn.Linear, num_classes: int):
        super().__init__()
        self.body = body
        self.head = head
        self.num_classes = num_classes


class ProjectionDiscriminator(_HeadedDiscriminator):
    """D(x, y) = head(phi(x)) + <embed(y), phi(x)>, phi being D's penultimate (flattened) features."""

    def __init__(self, body: nn.Module, head: nn.Linear, num_classes: int):
        super().__init__(body, head, num_classes)
        self.embedding = nn.Embedding(num_classes, head.in_features)
        nn.init.normal_(self.embedding.weight, 0.0, 0.02)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        labels = _check_labels(labels, x.shape[0])
        features = self.body(x)
        return self.head(features).reshape(-1) + (self.embedding(labels).to(features.dtype) * features).sum(1)


class AuxiliaryClassifierDiscriminator(_HeadedDiscriminator):
    """AC-GAN's D: D(x) -> (real/fake logits, class logits) from D's penultimate features; labels unused.

    With ``twin`` (TAC-GAN) the class logits are 2 x num_classes wide: the class head's, then the twin's.
    """

    def __init__(self, body: nn.Module, head: nn.Linear, num_classes: int, twin: bool = False):
        super().__init__(body, head, num_classes)
        self.classifier = nn.Linear(head.in_features, num_classes * (2 if twin else 1))

    def forward(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_labels(labels, x.shape[0])  # the engine passes them; a caller without them has the wrong model
        features = self.body(x)
        return self.head(features).reshape(-1), self.classifier(features)


Builder = Callable[..., tuple[nn.Module, nn.Module]]


def build_conditional(builder: Builder, conditional: str, num_classes: int, shape: tuple[int, ...],
                      latent_dim: int, *args, label_embedding: int
                      ) -> tuple[ConditionalGenerator, nn.Module]:
    """The (G, D) of an unconditional ``builder`` (``gan.models``), conditioned on ``num_classes`` classes.

    ``args``: the builder's arguments after the latent size (hidden, channels, dropout, activation).
    ``label_embedding``: the width of G's label embedding, which joins z.
    """
    if conditional not in CONDITIONAL[1:]:
        raise ValueError(f"unknown conditional {conditional!r}; allowed: {', '.join(CONDITIONAL)}")
    if num_classes < 2:
        raise ValueError(f"a conditional model needs at least 2 classes, got {num_classes}")
    images = len(shape) == 3
    # The label always joins z. With conditional BatchNorm alone (the first version of ``projection``) the
    # classes start identical (gains N(1, 0.02), biases 0) and Adam moves each per-class gain by about lr
    # per update, so after 600 updates at lr 2e-4 the classes differ by ~0.1 of a unit-variance activation:
    # conditional accuracy stayed at chance. BigGAN-deep, too, feeds the class embedding to the first layer.
    if label_embedding < 1:
        raise ValueError(f"label_embedding must be >= 1, got {label_embedding}")
    joined_g, _ = builder(shape, latent_dim + label_embedding, *args)
    net = joined_g.net
    if conditional == "projection" and any(isinstance(m, nn.BatchNorm2d) for m in net):
        net = with_conditional_batchnorm(net, num_classes)  # and every BatchNorm is class-conditional
    generator = ConditionalGenerator(net, latent_dim, shape, num_classes,
                                     embedding=nn.Embedding(num_classes, label_embedding))
    if conditional == "concat":
        d_shape = (shape[0] + num_classes, *shape[1:]) if images else (math.prod(shape) + num_classes,)
        _, joined_d = builder(d_shape, latent_dim, *args)
        return generator, ConcatDiscriminator(joined_d.net, num_classes, as_planes=images)
    _, base_d = builder(shape, latent_dim, *args)
    body, head = base_d.net[:-1], base_d.net[-1]
    if conditional in ("acgan", "tacgan"):
        return generator, AuxiliaryClassifierDiscriminator(body, head, num_classes, twin=conditional == "tacgan")
    return generator, ProjectionDiscriminator(body, head, num_classes)
