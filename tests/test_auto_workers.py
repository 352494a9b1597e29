"""ray.num_workers: auto: one worker per GPU the cluster holds, one on CPUs; the resource check then passes."""

from __future__ import annotations

import pytest
import ray

from helpers import project_params
from pipeline import cluster, resources
from pipeline.resources import Node
from pipeline.config import validate


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_auto_is_one_worker_per_gpu_of_a_real_local_ray(gpus, capsys):
    cfg = validate(project_params())
    assert cfg.ray.num_workers == "auto"  # the shipped default
    ray.init(address="local", num_cpus=1, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    try:
        nodes = cluster.alive_nodes()
        use_gpu = resources.resolve_use_gpu(cfg.ray.use_gpu, nodes)
        workers = resources.resolve_num_workers(cfg, nodes, use_gpu)
        assert use_gpu and workers == gpus
        assert resources.check_resources(cfg, nodes, workers=workers, use_gpu=use_gpu, key="ray.num_workers") == 1
    finally:
        ray.shutdown()
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ray.num_workers")]
    assert line.startswith(f"ray.num_workers: auto: {gpus} worker(s), one per GPU") and f"{gpus} GPU" in line


def gpu_node(gpus: float) -> list[Node]:
    return [Node("a" * 56, "10.0.0.1", {"CPU": 16.0, "GPU": gpus})]


@pytest.mark.parametrize("overrides, nodes, use_gpu, expected", [
    ({}, gpu_node(0), False, 1),                                           # CPUs: one worker
    ({}, gpu_node(8), True, 8),
    ({"ray.max_workers": 2}, gpu_node(8), True, 2),
    ({"train.batch_size": 36}, gpu_node(8), True, 6),                      # 8 does not split 36: 6 does
    ({"train.batch_size": 36, "train.batch_scaling": "per_worker"}, gpu_node(8), True, 8),
    ({"ray.num_workers": 3}, gpu_node(8), True, 3),                        # a number is kept as it is
])
def test_auto_caps_and_splits_the_batch_evenly(overrides, nodes, use_gpu, expected):
    params = project_params()
    for key, value in overrides.items():
        section, leaf = key.split(".")
        params[section][leaf] = value
    assert resources.resolve_num_workers(validate(params), nodes, use_gpu) == expected
