"""A checkpoint cut short: resume falls back to the one before it, with one warning naming both."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from conftest import end_process_tree, make_dvc_repo, read_until, run_cmd, tool_env
from test_train_stage import mlflow_client, small_params

pytestmark = pytest.mark.integration

EPOCHS = 6


def settled_snapshot(path) -> dict:
    """Ray's checkpoint list once it stops changing: Train's controller actor outlives a killed driver briefly,
    and may register one more checkpoint meanwhile."""
    last, unchanged_since = None, time.monotonic()
    while time.monotonic() - unchanged_since < 10:
        current = path.read_text()
        if current != last:
            last, unchanged_since = current, time.monotonic()
        time.sleep(1)
    return json.loads(last)


def test_a_truncated_newest_checkpoint_resumes_from_the_one_before(mirror, tmp_path):
    repo = make_dvc_repo(tmp_path / "repo", small_params(mirror.url, epochs=EPOCHS))
    process = subprocess.Popen(["dvc", "repro", "train@mnist"], cwd=repo, text=True, env=tool_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen: list[str] = []
    try:
        # Ray's snapshot, which a resume reads, lags the printed line by up to one checkpoint.
        read_until(process, r"checkpoint of epoch 3 saved", seen)
        os.killpg(process.pid, signal.SIGKILL)  # the driver and DVC: the run stays resumable
        process.wait(timeout=60)
    finally:
        end_process_tree(process)

    (run_folder,) = (repo / "ray_results").glob("train-mnist-*")
    snapshot = settled_snapshot(run_folder / "checkpoint_manager_snapshot.json")
    newest = run_folder / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]  # what a resume starts from
    before = max(path for path in run_folder.glob("checkpoint_*") if path.is_dir() and path.name < newest.name)
    epoch = torch.load(newest / "rank0.pt", weights_only=True)["epoch"]
    cut = newest / "rank0.pt"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # killed while writing, or a full disk

    result = run_cmd(["dvc", "repro", "train@mnist"], repo)
    output = result.stdout + result.stderr
    (warning,) = [line for line in output.splitlines() if "is unreadable" in line] or [output[-3000:]]
    assert re.search(rf"warning: the newest checkpoint \S*{newest.name} is unreadable \(.+\); "
                     rf"resuming from the one before it, \S*{before.name}$", warning), warning
    assert f"resumed from the checkpoint of epoch {epoch - 1}" in output
    summary = json.loads((repo / "metrics/train/mnist.json").read_text())
    assert summary["epoch"] == EPOCHS and summary["status"] == "completed"
    client = mlflow_client(repo)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["ganpipe.resumed_from_epoch"] == str(epoch - 1)
    assert {m.step for m in client.get_metric_history(run.info.run_id, "quality/fid")} == set(range(1, EPOCHS + 1))
