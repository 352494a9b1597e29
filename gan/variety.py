"""Realism and variety of samples, from k-nearest-neighbour balls in the evaluator's feature space.

FID folds realism and variety into one number: a generator that replays a few
real images per class scores a near-perfect FID and covers almost nothing.
These metrics pull the two apart:

- improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold
  is the union of balls around its points reaching to their k-th nearest
  neighbour (k = 3). Precision is the share of samples inside the real
  manifold (do they look real?), recall the share of real images inside the
  samples' manifold (is the data's variety drawn?);
- density and coverage (Naeem et al. 2020), from the real balls only (k = 5),
  so one outlier sample cannot inflate them: density counts how many real balls
  hold each sample, divided by k (about 1 when the sets match); coverage is the
  share of real images whose ball holds at least one sample.

Distances are ``torch.cdist`` blocks on the features' device, reduced there;
only the four results come back to the host.
"""

from __future__ import annotations

import torch

PR_NEIGHBOURS = 3  # k of improved precision and recall (Kynkäänniemi et al. 2019)
DC_NEIGHBOURS = 5  # k of density and coverage (Naeem et al. 2020)
VARIETY_KEYS = ("precision", "recall", "density", "coverage")


def _knn_radii(points: torch.Tensor, ks: tuple[int, ...], batch_size: int) -> list[torch.Tensor]:
    """For each k in ``ks``: the distance from each point to its k-th nearest other point."""
    # Ascending distances; column 0 is the point itself.
    nearest = torch.cat([torch.cdist(chunk, points).topk(max(ks) + 1, dim=1, largest=False).values
                         for chunk in points.split(batch_size)])
    return [nearest[:, k] for k in ks]


def variety(real_feats, fake_feats, k: int = PR_NEIGHBOURS, k_density: int = DC_NEIGHBOURS,
            batch_size: int = 1000) -> dict[str, float]:
    """Precision, recall, density and coverage of the fakes against the reals (``VARIETY_KEYS``).

    The figures depend on the set sizes (more points, smaller balls): compare
    runs at equal sizes, and the reals and fakes in equal numbers.
    """
    real = torch.as_tensor(real_feats).detach().float()
    fake = torch.as_tensor(fake_feats).detach().to(real.device, torch.float32)
    if min(len(real), len(fake)) <= max(k, k_density):
        raise ValueError(f"precision/recall (k={k}) and density/coverage (k={k_density}) need more than "
                         f"{max(k, k_density)} samples per set, got {len(real)} real and {len(fake)} generated")
    real_radius, real_density_radius = _knn_radii(real, (k, k_density), batch_size)
    fake_radius, = _knn_radii(fake, (k,), batch_size)

    # One pass over the real x fake distances, a block of reals at a time.
    fake_is_real = torch.zeros(len(fake), dtype=torch.bool, device=real.device)
    balls_holding_fake = torch.zeros(len(fake), dtype=torch.long, device=real.device)
    real_is_drawn, real_is_covered = [], []
    for chunk, radius, density_radius in zip(real.split(batch_size), real_radius.split(batch_size),
                                             real_density_radius.split(batch_size)):
        distances = torch.cdist(chunk, fake)  # (block of reals, fakes)
        fake_is_real |= (distances <= radius[:, None]).any(0)
        # Density and coverage compare strictly, as Naeem et al. do: identical sets then score exactly 1.
        balls_holding_fake += (distances < density_radius[:, None]).sum(0)
        real_is_drawn.append((distances <= fake_radius).any(1))
        real_is_covered.append(distances.min(1).values < density_radius)
    scores = torch.stack([fake_is_real.double().mean(), torch.cat(real_is_drawn).double().mean(),
                          balls_holding_fake.double().mean() / k_density, torch.cat(real_is_covered).double().mean()])
    return dict(zip(VARIETY_KEYS, scores.tolist()))


def variety_within_class(real_feats: torch.Tensor, real_labels: torch.Tensor, fake_feats: torch.Tensor,
                         fake_labels: torch.Tensor, **knn) -> dict[str, float]:
    """``variety`` of the samples asked for each class k against the real images of class k.

    Per class ``<key>_class_<k>``, and their mean over the classes ``<key>_within_class``.
    Each class compares equal numbers: the first reals of the class (shuffle them
    beforehand) against its samples. A class with too few of either is left out.
    """
    per_class = {}
    for label in range(int(fake_labels.max()) + 1):
        real, fake = real_feats[real_labels == label], fake_feats[fake_labels == label]
        size = min(len(real), len(fake))
        if size > max(knn.get("k", PR_NEIGHBOURS), knn.get("k_density", DC_NEIGHBOURS)):
            per_class[label] = variety(real[:size], fake[:size], **knn)
    if not per_class:
        return {}
    means = {f"{key}_within_class": sum(scores[key] for scores in per_class.values()) / len(per_class)
             for key in VARIETY_KEYS}
    return {**means, **{f"{key}_class_{label}": scores[key]
                        for label, scores in per_class.items() for key in VARIETY_KEYS}}
