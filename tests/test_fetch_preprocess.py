"""fetch + preprocess: downloads against a loopback mirror, strict IDX parsing, real `dvc repro`."""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import BAR, idx_bytes, make_dvc_repo, md5, on_a_terminal, project_params, run_cmd, synthetic_split
from gan.data import DatasetSpec, IDXError, load_idx_split, read_idx
from pipeline.fetch import FetchError, fetch_dataset, fetch_file

NO_WAIT = dict(backoff_s=0.0)


def spec_for(files: dict[str, bytes]) -> DatasetSpec:
    return DatasetSpec(name="synthetic", kind="idx", shape=(1, 28, 28),
                       files={name: md5(data) for name, data in files.items()})


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_fetch_downloads_and_verifies_every_file(mirror, tmp_path):
    paths = fetch_dataset(spec_for(mirror.files), [mirror.url], tmp_path / "raw", **NO_WAIT)
    assert sorted(p.name for p in paths) == sorted(mirror.files)
    for path in paths:
        assert path.read_bytes() == mirror.files[path.name]
    assert leftovers(tmp_path / "raw") == sorted(mirror.files)  # no temp files


def test_checksum_mismatch_tries_next_mirror_and_leaves_nothing(mirror, tmp_path):
    good = dict(mirror.files)
    name = "train-labels-idx1-ubyte.gz"
    corrupt = bytearray(good[name])
    corrupt[len(corrupt) // 2] ^= 0xFF
    mirror.files[name] = bytes(corrupt)  # the first mirror serves a corrupted copy
    local = tmp_path / "local"
    local.mkdir()
    (local / name).write_bytes(good[name])
    target = tmp_path / "raw"
    target.mkdir()

    path = fetch_file(name, [mirror.url, str(local)], target, expected_md5=md5(good[name]), retries=2, **NO_WAIT)
    assert path.read_bytes() == good[name]
    assert mirror.requests.count(name) == 2  # both attempts on the corrupt mirror

    only_corrupt = tmp_path / "only_corrupt"
    only_corrupt.mkdir()
    with pytest.raises(FetchError, match="md5 mismatch"):
        fetch_file(name, [mirror.url], only_corrupt, expected_md5=md5(good[name]), retries=1, **NO_WAIT)
    assert leftovers(only_corrupt) == []


def test_truncated_transfer_is_rejected_without_partial_file(mirror, tmp_path):
    name = "t10k-images-idx3-ubyte.gz"
    mirror.truncate.add(name)
    with pytest.raises(FetchError, match="truncated"):
        fetch_file(name, [mirror.url], tmp_path, expected_md5=None, retries=2, **NO_WAIT)
    assert leftovers(tmp_path) == []


def test_retry_after_404_succeeds(mirror, tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    mirror.fail_first[name] = [404, 503]
    waits = []
    path = fetch_file(name, [mirror.url], tmp_path, expected_md5=md5(mirror.files[name]),
                      retries=3, backoff_s=0.25, sleep=waits.append)
    assert path.read_bytes() == mirror.files[name]
    assert waits == [0.25, 0.5]  # exponential backoff between the three attempts
    assert mirror.requests.count(name) == 3


def test_every_mirror_failing_lists_each_with_its_error(tmp_path):
    dead = "http://127.0.0.1:9/"  # discard port: nothing listens
    missing_dir = tmp_path / "nowhere"
    with pytest.raises(FetchError) as info:
        fetch_file("train-images-idx3-ubyte.gz", [dead, str(missing_dir), f"file://{missing_dir}"],
                   tmp_path, expected_md5=None, retries=1, **NO_WAIT)
    message = str(info.value)
    assert f"{dead}: unreachable" in message
    assert f"{missing_dir}: no such file" in message
    assert f"file://{missing_dir}: no such file" in message
    assert "data.mirrors" in message  # says how to point at a local copy
    assert leftovers(tmp_path) == []


def test_read_idx_round_trip_and_strict_errors(tmp_path):
    images, labels = synthetic_split(12, seed=0)
    (tmp_path / "img.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (tmp_path / "lab").write_bytes(idx_bytes(labels))
    x, y = load_idx_split(tmp_path / "img.gz", tmp_path / "lab")
    np.testing.assert_array_equal(x, images)
    assert y.dtype == np.int64 and list(y) == list(labels)

    (tmp_path / "short").write_bytes(idx_bytes(images)[:-5])
    with pytest.raises(IDXError, match=r"short: length .* file truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "magic").write_bytes(b"\x12\x34" + idx_bytes(images)[2:])
    with pytest.raises(IDXError, match="magic: bad magic number 1234"):
        read_idx(tmp_path / "magic")
    with pytest.raises(IDXError, match="lab: has 1 dimensions, expected 3"):
        read_idx(tmp_path / "lab", expect_ndim=3)
    (tmp_path / "lab5").write_bytes(idx_bytes(labels[:5]))
    with pytest.raises(IDXError, match="lab5: 5 labels for 12 images"):
        load_idx_split(tmp_path / "img.gz", tmp_path / "lab5")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(idx_bytes(images))[:-20])
    with pytest.raises(IDXError, match="cut.gz: cannot read"):
        read_idx(tmp_path / "cut.gz")


@pytest.mark.integration
def test_dvc_repro_of_fashion_mnist_alone_matches_served_arrays_and_runs_every_stage(mirror, tmp_path):
    """One dataset, not the first shipped: preprocess keeps the served arrays, and every stage runs, sweep included
    (tiny budgets: a 1-trial sweep of one epoch), drawing progress bars on a terminal."""
    repo = make_dvc_repo(tmp_path / "repo", project_params(
        data={"datasets": ["fashion_mnist"], "mirrors": {"fashion_mnist": [mirror.url]}, "verify_checksums": False},
        model={"name": "mlp", "hidden": [32], "latent_dim": 8},
        train={"epochs": 1, "batch_size": 64, "eval_samples": 100, "log_every": 2},
        evaluator={"epochs": 1, "batch_size": 64},
        ray={"num_workers": 1, "use_gpu": False},
        sweep={"space": {"lr_g": [1e-3]}, "num_samples": 1, "epochs": 1, "scheduler": "fifo",
               "max_concurrent_trials": 1}))
    result = run_cmd(["dvc", "repro", "preprocess@fashion_mnist"], repo)
    assert "not checked against their published md5" in result.stderr + result.stdout

    with np.load(repo / "data/processed/fashion_mnist.npz") as npz:
        assert sorted(npz.files) == ["x_test", "x_train", "y_test", "y_train"]
        served = {name: gzip.decompress(data) for name, data in mirror.files.items()}
        expect_train, expect_labels = synthetic_split(300, seed=1)
        np.testing.assert_array_equal(npz["x_train"], expect_train)
        np.testing.assert_array_equal(npz["y_train"], expect_labels)
        assert npz["x_train"].dtype == np.uint8 and npz["x_train"].shape == (300, 28, 28)
        assert npz["y_test"].dtype == np.int64 and npz["x_test"].shape == (100, 28, 28)
        assert npz["x_test"].tobytes() == served["t10k-images-idx3-ubyte.gz"][16:]

    summary = json.loads((repo / "data/processed/fashion_mnist.json").read_text())
    assert summary["train"]["count"] == 300 and summary["test"]["count"] == 100
    assert summary["train"]["class_histogram"] == [30] * 10
    assert 0 < summary["train"]["pixel_mean"] < 1
    png = (repo / "data/processed/fashion_mnist_real.png").read_bytes()
    assert png.startswith(b"\x89PNG")

    dag = run_cmd(["dvc", "dag", "--md"], repo).stdout
    assert "fetch@fashion_mnist" in dag and "preprocess@fashion_mnist" in dag

    # A second repro has nothing to do: the stages are cached.
    again = run_cmd(["dvc", "repro", "preprocess@fashion_mnist"], repo)
    assert "didn't change, skipping" in again.stdout

    # data.train_images (make demo's subset) is a tracked param: changing it re-runs preprocess.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["train_images"] = 120
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cut = run_cmd(["dvc", "repro", "preprocess@fashion_mnist"], repo)
    assert "Running stage 'preprocess@fashion_mnist'" in cut.stdout and "Running stage 'fetch@fashion_mnist'" not in cut.stdout
    with np.load(repo / "data/processed/fashion_mnist.npz") as npz:
        np.testing.assert_array_equal(npz["x_train"], expect_train[:120])
        np.testing.assert_array_equal(npz["y_train"], expect_labels[:120])
        assert npz["x_test"].shape == (100, 28, 28)  # the floor is measured on the whole test split

    # The rest of the stages, on a terminal as a user runs them: train and the sweep draw their progress bars.
    shown = on_a_terminal(["dvc", "repro"], repo)
    assert re.search(r"epoch 1/1 it (\d+)/\1 loss_d", shown) and BAR in shown and "img/s" in shown, shown[-3000:]
    assert "sweep: 100%" in shown and "1/1" in shown and "best fid" in shown, shown[-3000:]
    assert json.loads((repo / "metrics/train/fashion_mnist.json").read_text())["status"] == "completed"
    trials = pd.read_csv(repo / "sweep/results.csv")
    assert len(trials) == 1 and trials["fid"].notna().all(), trials
    assert json.loads((repo / "sweep/summary.json").read_text())["dataset"] == "fashion_mnist"


@pytest.mark.integration
def test_dvc_repro_reports_truncated_idx_file(mirror, tmp_path):
    name = "train-labels-idx1-ubyte.gz"
    mirror.files[name] = gzip.compress(gzip.decompress(mirror.files[name])[:-10])
    repo = make_dvc_repo(tmp_path / "repo", project_params(
        data={"datasets": ["mnist"], "mirrors": {"mnist": [mirror.url]}, "verify_checksums": False}))
    result = run_cmd(["dvc", "repro", "preprocess@mnist"], repo, check=False)
    assert result.returncode != 0
    assert "train-labels-idx1-ubyte.gz: length" in result.stderr
    assert not (repo / "data/processed/mnist.npz").exists()


@pytest.mark.integration
def test_fetch_cli_without_any_server_fails_clearly(tmp_path):
    repo = make_dvc_repo(tmp_path / "repo", project_params(
        data={"datasets": ["mnist"], "mirrors": {"mnist": ["http://127.0.0.1:9/"]}, "retries": 1}))
    result = run_cmd(["ganpipe", "fetch", "--dataset", "mnist"], repo, check=False)
    assert result.returncode == 1
    assert "ganpipe fetch: error: could not fetch" in result.stderr
    assert "http://127.0.0.1:9/: unreachable" in result.stderr
    assert "Traceback" not in result.stderr
    assert leftovers(repo / "data/raw/mnist") == []
