"""Bad data, bad folders, bad spool records, a taken port: one line on stderr, exit 1, nothing left behind.

One row per case. Each runs the real command in a fresh folder (in-process through
``cli.main`` where it can, as a subprocess where the command would start one) and
checks the standard every user error meets: exit code 1, exactly one line on stderr
that names the problem, no traceback, no file left behind but those the row names,
and no process left running.
"""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers import (REPO_ROOT, end_process_tree, idx_bytes, project_params, synthetic_idx_files, synthetic_split,
                     tool_env)
from pipeline import cli


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, str]:
    """A real MLflow SQLite store and a run in it, shared by the rows (making a store takes seconds)."""
    folder = tmp_path_factory.mktemp("store")
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.create_experiment("bad-inputs", artifact_location=str(folder / "artifacts"))
    return client.tracking_uri, client.create_run(experiment).info.run_id


# --------------------------------------------------------------------------- the rows: (argv, says, leaves)
# Each row sets up its folder and returns the command, the words its one line must hold,
# and the files (besides params.yaml) the folder holds afterwards.

def write_records(folder: Path, records: list[bytes]) -> None:
    folder.mkdir(parents=True)
    for number, record in enumerate(records, 1):
        (folder / f"{number:08d}.json").write_bytes(record)


def metric_record(run_id: str, key: str, step: int) -> bytes:
    return json.dumps({"op": "batch", "run_id": run_id, "params": [], "tags": [],
                       "metrics": [[key, float(step), 1_000 + step, step]]}).encode()


def bad_record(content: bytes, why: str, says: str = "spool/w/00000002.json cannot be delivered"):
    """A spool whose middle record is ``content``: it is quarantined and named, the records around it delivered."""
    def row(tmp_path: Path, store, key: str):
        uri, run_id = store
        write_records(tmp_path / "spool" / "w", [metric_record(run_id, key, 1), content, metric_record(run_id, key, 3)])
        return (["sync", "spool"], [says, why, "moved to spool/quarantine/w-00000002.json", "2 other record(s) delivered"],
                {"spool/w/.lock", "spool/quarantine/w-00000002.json"})
    return row


def missing_spool_folder(tmp_path: Path, store, key: str):
    return ["sync", "spol"], ["spol: no such spool folder"], set()


def write_raw(tmp_path: Path, *, labels=None, size: int = 28) -> set[str]:
    """data/raw/mnist as fetch leaves it, of small synthetic splits; the train split's labels and size as given."""
    files = synthetic_idx_files(n_train=30, n_test=10)
    images, default_labels = synthetic_split(30, seed=1)
    files["train-images-idx3-ubyte.gz"] = gzip.compress(idx_bytes(np.resize(images, (30, size, size))))
    files["train-labels-idx1-ubyte.gz"] = gzip.compress(idx_bytes(default_labels if labels is None else labels))
    folder = tmp_path / "data" / "raw" / "mnist"
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return {f"data/raw/mnist/{name}" for name in files}


def label_outside_the_classes(tmp_path: Path, store, key: str):
    labels = np.arange(30) % 10
    labels[7] = 42
    raw = write_raw(tmp_path, labels=labels)
    return (["preprocess", "--dataset", "mnist"],
            ["data/raw/mnist/train-labels-idx1-ubyte.gz: label 42 at index 7", "labels are 0..9"], raw)


def images_of_the_wrong_size(tmp_path: Path, store, key: str):
    raw = write_raw(tmp_path, size=32)
    return (["preprocess", "--dataset", "mnist"],
            ["data/raw/mnist/train-images-idx3-ubyte.gz: images are 32x32, mnist images are 28x28"], raw)


def data_is_a_file(command: str, folder: str):
    """A target folder that cannot be made (a file sits where a folder above it should be): what root, to whom
    permission bits mean nothing, meets as a read-only folder's PermissionError."""
    def row(tmp_path: Path, store, key: str):
        (tmp_path / "data").write_text("not a folder")
        return [command, "--dataset", "mnist"], [f"{folder}: cannot write there: data is a file"], {"data"}
    return row


def part_file_is_a_folder(tmp_path: Path, store, key: str):
    """A write that fails inside a writable folder (where a full disk would fail): the mirror is not blamed."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, content in synthetic_idx_files(n_train=30, n_test=10).items():
        (mirror / name).write_bytes(content)
    (tmp_path / "data" / "raw" / "mnist" / ".train-images-idx3-ubyte.gz.part").mkdir(parents=True)
    return (["fetch", "--dataset", "mnist"],
            ["data/raw/mnist/.train-images-idx3-ubyte.gz.part: cannot write", "not of the mirror"],
            {f"mirror/{name}" for name in synthetic_idx_files()})


def missing_npz(tmp_path: Path, store, key: str):
    return (["evaluator", "--dataset", "mnist"],
            ["data/processed/mnist.npz: no processed data for mnist", "`dvc repro preprocess@mnist`"], set())


def busy_ui_port(tmp_path: Path, store, key: str):
    (tmp_path / "mlruns").mkdir()
    (tmp_path / "mlruns" / "mlflow.db").touch()  # the store is looked for before the port
    return ["ui", "--port", "{port}"], ["port {port} on 127.0.0.1 is already in use", "--port"], {"mlruns/mlflow.db"}


ROWS = {
    "sync: a mistyped spool folder": missing_spool_folder,
    "sync: a record of random bytes": bad_record(bytes(range(256)) * 4, "not JSON"),
    "sync: a record of truncated JSON": bad_record(b'{"op": "batch", "run_id": "ab', "not JSON"),
    "sync: a record of an unknown operation": bad_record(b'{"op": "rename_run", "run_id": "x"}',
                                                         "unknown operation 'rename_run'"),
    "sync: a record that is not an object": bad_record(b"[1, 2, 3]", "a JSON list, not an object"),
    "sync: a record without its fields": bad_record(b'{"op": "terminate", "run_id": "x"}',
                                                    "a terminate record without status, end_time"),
    "sync: a record the store refuses": bad_record(metric_record("0" * 32, "loss", 2), "retrying cannot fix this",
                                                   "the MLflow server refused a batch call"),
    "ui: a port another program holds": busy_ui_port,
    "fetch: data/ is a file": data_is_a_file("fetch", "data/raw/mnist"),
    "fetch: a local write fails": part_file_is_a_folder,
    "preprocess: data/ is a file": data_is_a_file("preprocess", "data/processed"),
    "preprocess: a label outside the classes": label_outside_the_classes,
    "preprocess: images of the wrong size": images_of_the_wrong_size,
    "evaluator: no processed data": missing_npz,
}


def files_in(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()} - {"params.yaml"}


def run_ui(argv: list[str]) -> tuple[int, str]:
    """`ganpipe ui` as a user starts it, with a real socket holding the port; ended by pid whatever happens."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = str(holder.getsockname()[1])
    # This checkout's code, whichever checkout the venv's `ganpipe` script was installed from.
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "--params", "params.yaml",
                                *[a.format(port=port) for a in argv]], env={**tool_env(), "PYTHONPATH": str(REPO_ROOT)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = process.communicate(timeout=60)
        return process.returncode, err.replace(port, "{port}")
    finally:
        if process.poll() is None:
            end_process_tree(process)
        holder.close()


@pytest.mark.parametrize("case", ROWS)
def test_a_bad_input_is_one_line_and_leaves_nothing(case, store, tmp_path, monkeypatch, capsys):
    uri, run_id = store
    monkeypatch.chdir(tmp_path)
    key = f"row{list(ROWS).index(case)}"
    argv, says, leaves = ROWS[case](tmp_path, store, key)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(project_params(mlflow={"tracking_uri": uri},
                                                                        data={"datasets": ["mnist"], "mirrors": {"mnist": ["mirror"]}})))
    children = {child.pid for child in psutil.Process().children(recursive=True)}
    started = time.monotonic()
    if argv[0] == "ui":
        code, err = run_ui(argv)
    else:
        code, err = cli.main(["--params", "params.yaml", *argv]), capsys.readouterr().err

    assert code == 1, err
    assert err.startswith(f"ganpipe {argv[0]}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for words in says:
        assert words in err, err
    assert "mirror" not in err or "not of the mirror" in err  # a local problem is never a mirror's
    assert files_in(tmp_path) == leaves
    assert {child.pid for child in psutil.Process().children(recursive=True)} <= children
    assert time.monotonic() - started < 60
    if argv[0] == "sync" and "spool/w" in str(leaves):  # the records around the bad one were delivered
        history = MlflowClient(uri).get_metric_history(run_id, key)
        assert sorted(metric.step for metric in history) == [1, 3]
