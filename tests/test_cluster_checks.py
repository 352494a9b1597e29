"""Fast checks of pipeline/cluster.py's arithmetic and messages, without a cluster (see test_cluster.py)."""

from __future__ import annotations

import socket
import time

import pytest

from helpers import project_params
from pipeline import cluster, resources
from pipeline.resources import ClusterError, Node
from pipeline.config import validate

CPU = {"CPU": 1.0}


def nodes(*cpus: float, gpus: float = 0) -> list[Node]:
    return [Node(f"{i:056x}", f"10.0.0.{i}", {"CPU": c, "GPU": gpus}) for i, c in enumerate(cpus, 1)]


def test_concurrent_capacity_counts_the_trial_share_beside_its_workers():
    two_small = nodes(1, 1)
    assert resources.concurrent_capacity(two_small, 2, CPU, limit=4) == 1
    # The 0.01-CPU trial token leaves 0.99 CPU on its node: a 2-worker trial can never be placed.
    assert resources.concurrent_capacity(two_small, 2, CPU, {"CPU": 0.01}, limit=4) == 0
    assert resources.concurrent_capacity(two_small, 1, CPU, {"CPU": 0.01}, limit=4) == 1
    assert resources.concurrent_capacity(nodes(4, 4), 2, CPU, {"CPU": 0.01}, limit=8) == 3
    assert resources.concurrent_capacity(nodes(8, gpus=2), 2, {"GPU": 1.0}, limit=8) == 1
    assert resources.concurrent_capacity(nodes(8, 8), 1, {"GPU": 1.0}, limit=8) == 0


def test_check_resources_names_the_key_and_the_nodes():
    cfg = validate(project_params())
    with pytest.raises(ClusterError) as info:
        resources.check_resources(cfg, nodes(1, 1), workers=2, use_gpu=False, key="sweep.num_workers",
                                trial={"CPU": 0.01})
    message = str(info.value)
    assert message.startswith("params.yaml: sweep.num_workers: a run needs 2 worker(s) of 1 CPU plus the Tune "
                              "trial's own 0.01 CPU")
    assert "10.0.0.1" in message and "10.0.0.2" in message and "ray.autoscale: true" in message
    assert resources.check_resources(cfg, nodes(1, 1), workers=1, use_gpu=False, key="k", trial={"CPU": 0.01},
                                   trials=2) == 1
    autoscaling = validate(project_params(ray={"autoscale": True}))
    assert resources.check_resources(autoscaling, nodes(1), workers=8, use_gpu=True, key="k", trials=3) == 3


@pytest.mark.parametrize("batch, workers, images, message", [
    (63, 2, 300, "train.batch_size = 63 cannot be split evenly over ray.num_workers = 2"),
    (1, 2, 300, "train.batch_size = 1 cannot be split evenly over ray.num_workers = 2"),
    (400, 2, 300, "gives each of the 2 workers 200 samples per step, more than its shard of 150"),
])
def test_check_batch(batch, workers, images, message):
    with pytest.raises(ClusterError, match=message.replace("(", r"\(")):
        resources.check_batch(batch, workers, images)


def test_check_batch_accepts_an_even_split():
    resources.check_batch(64, 2, 300)
    resources.check_batch(150, 1, 150)


def test_sqlite_store_is_refused_only_on_a_multi_node_cluster():
    cluster.check_tracking_store("sqlite:////p/mlruns/mlflow.db", nodes(1))
    cluster.check_tracking_store("http://mlflow:5000", nodes(1, 1))
    for uri in ("sqlite:////p/mlruns/mlflow.db", "file:///p/mlruns", "/p/mlruns"):
        with pytest.raises(ClusterError, match="mlflow.tracking_uri"):
            cluster.check_tracking_store(uri, nodes(1, 1))


def test_null_address_always_starts_a_fresh_local_ray(monkeypatch):
    import ray

    calls = []
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    cluster.connect(validate(project_params(ray={"address": None})))
    assert calls and calls[0]["address"] == "local"  # never a cluster a former `ray start` left behind


def test_unreachable_address_fails_with_one_line_naming_ray_address(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    address = f"127.0.0.1:{port}"
    started = time.monotonic()
    with pytest.raises(ClusterError) as info:
        cluster.wait_for_port(address, cluster.resolve_address(address), timeout_s=1)
    assert time.monotonic() - started < 10
    # Said at once, not after the wait: what it waits for, and how long.
    assert capsys.readouterr().out == f"ray.address = '{address}': nothing answers at {address} yet; waiting up to " \
                                      "1 s for the Ray cluster\n"
    message = str(info.value)
    assert message.startswith(f"params.yaml: ray.address = '{address}': no Ray cluster answered at {address}")
    assert "\n" not in message
    assert cluster.resolve_address("ray://head:10001") == ("head", 10001)
    with pytest.raises(ClusterError, match="ray.address = 'nonsense'"):
        cluster.resolve_address("nonsense")
