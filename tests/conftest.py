"""Fixtures: a loopback HTTP mirror, repositories where the real stages ran, MLflow and process hygiene.

The helpers they use live in tests/helpers.py.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch

from helpers import (FIXTURE_EVALUATOR, SESSION_MARK, TOOL_PROCESS, UNUSED_MIRROR, copy_repo, make_dvc_repo,
                     project_params, run_cmd, serve_mirror, started_by, sweep_params)


@pytest.fixture
def mirror():
    with serve_mirror() as state:
        yield state


# With two pytest-xdist workers (`make test PYTEST_ARGS="-n 2 --dist loadgroup"`) a group runs on one worker, so
# a module's shared fixtures are built once: each module is a group, and the tests that read the swept repository
# form one more. The slowest groups are handed out first, so neither worker is left with a long tail.
SLOW_GROUPS_FIRST = ["test_cluster", "test_train_stage", "swept", "test_spool", "test_gpu_pipeline", "test_user_view",
                     "test_sweep", "test_fetch_preprocess",
                     "test_conditional_pipeline", "test_ddp"]


def xdist_group(item: pytest.Item) -> str:
    module = item.module.__name__
    return "swept" if "swept_repo" in item.fixturenames or module == "test_ui" else module


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    def rank(item):
        group = xdist_group(item)
        return SLOW_GROUPS_FIRST.index(group) if group in SLOW_GROUPS_FIRST else len(SLOW_GROUPS_FIRST)

    for item in items:
        item.add_marker(pytest.mark.xdist_group(xdist_group(item)))
    items.sort(key=rank)  # stable: the order within a group stays


@pytest.fixture(autouse=True)
def mlflow_uris_reset():
    """mlflow's tracking and registry URIs are process-wide: one test's store must not answer the next one's calls."""
    yield
    if "mlflow" in sys.modules:
        import mlflow
        from mlflow.tracking._model_registry import utils as registry_utils

        mlflow.set_tracking_uri(None)
        registry_utils._registry_uri = None  # set_registry_uri(None) would keep the exported variable
        os.environ.pop("MLFLOW_REGISTRY_URI", None)


@pytest.fixture(scope="session")
def evaluated_repo(tmp_path_factory) -> Path:
    """A repository with the fixture's data and evaluator made (DVC outputs) and nothing trained: tests train in
    copies of it (``copy_repo``), where DVC finds fetch, preprocess and evaluator up to date."""
    with serve_mirror() as state:
        data = {"datasets": ["mnist"], "mirrors": {"mnist": [state.url]}, "verify_checksums": False}
        params = project_params(data=data, evaluator=FIXTURE_EVALUATOR)
        repo = make_dvc_repo(tmp_path_factory.mktemp("evaluated") / "repo", params)
        run_cmd(["dvc", "repro", "evaluator@mnist"], repo)
    run_cmd(["git", "add", "-A"], repo)
    run_cmd(["git", "commit", "-qm", "evaluator"], repo)
    return repo


@pytest.fixture
def one_thread():
    """One torch thread for the test: bit-exact comparisons need a fixed count, and tiny models only contend."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def swept_repo(evaluated_repo, tmp_path_factory) -> tuple[Path, str]:
    """A repository where the real `dvc repro sweep` and `dvc repro train@mnist` ran: (repo, sweep stdout).

    Shared by the sweep and the MLflow UI tests, so the slow part runs once.
    """
    repo = copy_repo(evaluated_repo, tmp_path_factory.mktemp("swept"), sweep_params(UNUSED_MIRROR))
    sweep = run_cmd(["dvc", "repro", "sweep"], repo)
    run_cmd(["dvc", "repro", "train@mnist"], repo)
    return repo, sweep.stdout


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_suite():
    """Fails the suite if a Ray or MLflow process that a test started is still alive at the end (then ends it).

    Ray daemonizes its processes, so they are not the suite's descendants: the suite marks its own environment
    instead, and only processes that inherited the mark count. Another suite on the same machine is left alone.
    """
    session = uuid.uuid4().hex
    os.environ[SESSION_MARK] = session
    started = time.time()

    def leftovers() -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter(["cmdline", "create_time"]):
            command = " ".join(process.info["cmdline"] or [])
            if (process.info["create_time"] >= started and TOOL_PROCESS.search(command)
                    and started_by(process, session)):
                found.append(process)
        return found

    yield
    deadline = time.monotonic() + 60  # Ray's processes take a few seconds to follow their driver out
    while leftovers() and time.monotonic() < deadline:
        time.sleep(1)
    left = leftovers()
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    assert not left, "processes started by the tests outlived the suite: " + "; ".join(
        f"pid {p.pid}: {' '.join(p.info['cmdline'] or [])[:200]}" for p in left)
