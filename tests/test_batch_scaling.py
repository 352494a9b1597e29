"""train.batch_scaling: the global batch split among the workers, or each worker at the full batch (docs/gpu.md)."""

from __future__ import annotations

import pytest

from helpers import project_params
from pipeline import resources
from pipeline.resources import ClusterError
from pipeline.config import ConfigError, validate


def train_cfg(**train):
    return validate(project_params(train=train)).train


def test_each_workers_batch_follows_the_rule():
    assert train_cfg(batch_size=32).batch_scaling == "split"  # the default keeps the global batch
    assert [train_cfg(batch_size=32).worker_batch(w) for w in (1, 2, 4)] == [32, 16, 8]
    assert [train_cfg(batch_size=32, batch_scaling="per_worker").worker_batch(w) for w in (1, 2, 4)] == [32, 32, 32]
    with pytest.raises(ConfigError, match="train.batch_scaling = 'global' is invalid"):
        train_cfg(batch_scaling="global")


def test_the_batch_check_knows_the_rule():
    with pytest.raises(ClusterError, match="train.batch_size = 63 cannot be split evenly over ray.num_workers = 2"):
        resources.check_batch(63, 2, 300)
    resources.check_batch(63, 2, 300, per_worker=True)  # nothing to split: each worker trains at 63
    with pytest.raises(ClusterError, match="gives each of the 2 workers 200 samples per step, more than its shard "
                                           "of 150"):
        resources.check_batch(200, 2, 300, per_worker=True)
    resources.check_batch(200, 2, 300)  # split: 100 each
