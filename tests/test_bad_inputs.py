"""Every bad input is one line: the config, `ganpipe sample` and its files, each refused before any work starts.

Each row runs the real CLI in-process and asserts: a non-zero exit, exactly one line on stderr that names the
problem, no traceback, and no file left behind. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from helpers import REPO_ROOT, shipped_params, small_generator_record
from pipeline import cli
from pipeline.config import apply_overrides, load_config


def put_params(folder: Path, text: str | None = None, **overrides) -> None:
    params = apply_overrides(shipped_params(), overrides)
    (folder / "params.yaml").write_text(text if text is not None else yaml.safe_dump(params, sort_keys=False))


def setup_generator_file(folder: Path, kind: str) -> None:
    path = folder / "g.pt"
    good = small_generator_record()
    if kind == "random bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save(good, path)
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "a bare tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "wrong architecture":
        torch.save({**small_generator_record(latent_dim=16), "model": good["model"]}, path)
    elif kind == "good":
        torch.save(good, path)
    elif kind == "older format":
        torch.save({k: v for k, v in good.items() if k not in ("format", "noise")}, path)


def make_store(folder: Path) -> None:
    from mlflow.tracking import MlflowClient

    (folder / "mlruns").mkdir()
    MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}").search_experiments()


PRESETS = {"bad-yaml": "train: {lr_g: [1, 2\n", "unknown-key": "train:\n  lr_gg: 0.1\n"}

# (id, setup of the project folder, CLI arguments, what the one line must say)
CASES = [
    ("lr is inf", lambda f: put_params(f, **{"train.lr_g": float("inf")}), ["train", "--dataset", "mnist"],
     "train.lr_g = inf is invalid: Input should be a finite number"),
    ("sweep bound inf", lambda f: put_params(f, **{"sweep.space": {"lr_g": {"loguniform": [1e-4, float("inf")]}}}),
     ["sweep"], "sweep.space.lr_g.loguniform: needs [low, high] of finite numbers"),
    ("yaml tab", lambda f: put_params(f, "train:\n\tlr_g: 1\n"), ["train", "--dataset", "mnist"],
     "params.yaml: not valid YAML at line 2, column 1: found character '\\t' that cannot start any token"),
    ("params is a folder", lambda f: (f / "p").mkdir(), ["--params", "p", "train", "--dataset", "mnist"],
     "p: is a folder, not a YAML file"),
    ("params is a list", lambda f: put_params(f, "- 1\n- 2\n"), ["train", "--dataset", "mnist"],
     "params.yaml: must hold a mapping of sections, found a list"),
    ("preset bad yaml", lambda f: put_params(f, **{"preset": "bad-yaml"}), ["train", "--dataset", "mnist"],
     "preset 'bad-yaml': presets/bad-yaml.yaml: not valid YAML at line 2"),
    ("preset unknown key", lambda f: put_params(f, **{"preset": "unknown-key"}), ["train", "--dataset", "mnist"],
     "presets/unknown-key.yaml sets 'train.lr_gg', which is not a key of params.yaml"),
    ("tracking uri without scheme", lambda f: put_params(f, **{"mlflow.tracking_uri": "localhost:5000"}),
     ["train", "--dataset", "mnist"], "mlflow.tracking_uri = 'localhost:5000' is invalid: expected a URI with a "
                                      "scheme"),
    ("sample -n 0", put_params, ["sample", "--dataset", "mnist", "-n", "0"], "argument -n: 0 is not a positive"),
    ("sample -n -5", put_params, ["sample", "--dataset", "mnist", "-n", "-5"], "argument -n: -5 is not a positive"),
    ("sample --per-class 0", put_params, ["sample", "--dataset", "mnist", "--per-class", "0"],
     "argument --per-class: 0 is not a positive"),
    ("sample -o without .png", put_params, ["sample", "--dataset", "mnist", "-o", "out"],
     "-o out: name a .png file (e.g. -o out.png)"),
    ("sample -o where it cannot write", lambda f: (put_params(f), setup_generator_file(f, "good"),
                                                   (f / "blocker").write_text("a file, not a folder")),
     ["sample", "--dataset", "mnist", "--checkpoint", "g.pt", "-o", "blocker/x.png"],
     "-o blocker/x.png: cannot write there"),
    ("sample unknown dataset", put_params, ["sample", "--dataset", "cifar10"],
     "argument --dataset: invalid choice: 'cifar10'"),
    ("sample no generator", put_params, ["sample", "--dataset", "mnist", "-o", "x.png"],
     "no generator at models/mnist/generator.pt (run `dvc repro train@mnist` first)"),
    ("sample unknown run", put_params, ["sample", "--dataset", "mnist", "--mlflow-run", "nonexistent"],
     "--mlflow-run nonexistent: no MLflow store at "),
    ("sample unknown run in a store", lambda f: (put_params(f), make_store(f)),
     ["sample", "--dataset", "mnist", "--mlflow-run", "nonexistent"],
     "--mlflow-run nonexistent: no run with a logged generator in sqlite:///"),
    ("sample server down", lambda f: put_params(f, **{"mlflow.tracking_uri": "http://127.0.0.1:1"}),
     ["sample", "--dataset", "mnist", "--mlflow-run", "abc"], "--mlflow-run: MLflow at http://127.0.0.1:1 cannot be "
                                                            "reached"),
    ("evaluate -n 0", put_params, ["evaluate", "--dataset", "mnist", "-n", "0"], "argument -n: 0 is not a positive"),
    ("ui port 0", put_params, ["ui", "--port", "0"], "argument --port: 0 is not a port (1-65535)"),
    *[(f"generator file: {kind}", lambda f, kind=kind: (put_params(f), setup_generator_file(f, kind)),
       ["sample", "--dataset", "mnist", "--checkpoint", "g.pt", "-o", "x.png"], message) for kind, message in [
        ("random bytes", "g.pt: not a generator.pt or checkpoint.pt that ganpipe wrote"),
        ("empty", "g.pt: not a generator.pt or checkpoint.pt that ganpipe wrote"),
        ("truncated", "g.pt: not a generator.pt or checkpoint.pt that ganpipe wrote"),
        ("a bare tensor", "g.pt: holds a Tensor, not a generator.pt or checkpoint.pt"),
        ("wrong architecture", "g.pt: its weights do not fit the model it records"),
        ("older format", "g.pt was written by an older ganpipe and does not record how it samples"),
    ]],
]


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """An empty project folder with the presets (and the test's bad ones), as the working directory."""
    (tmp_path / "presets").mkdir()
    for path in (REPO_ROOT / "presets").glob("*.yaml"):
        (tmp_path / "presets" / path.name).write_text(path.read_text())
    for name, text in PRESETS.items():
        (tmp_path / "presets" / f"{name}.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if "mlruns" not in p.parts}


@pytest.mark.parametrize("setup, argv, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_bad_input_is_one_line_and_leaves_nothing(project, capsys, setup, argv, message):
    setup(project)
    before = files(project)
    capsys.readouterr()  # what the setup printed
    code = exit_code(argv)
    err = capsys.readouterr().err
    assert code not in (0, None)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    assert files(project) == before  # no partial output


def exit_code(argv: list[str]) -> int | None:
    """What `ganpipe ARGV` exits with: main's return, or the code of the SystemExit a wrong flag raises."""
    try:
        return cli.main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_debug_shows_the_traceback(project, capsys):
    put_params(project)
    assert cli.main(["--debug", "sample", "--dataset", "mnist", "-o", "x.png"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("(run `dvc repro train@mnist` first)")


def test_numbers_spelled_as_yaml_1_1_strings_are_numbers(project):
    """1e-3 is a float to a person (and YAML 1.2); quoted, it is still the number it spells."""
    put_params(project)
    text = (project / "params.yaml").read_text().replace("lr_g: 0.0002", "lr_g: 1e-3")
    shipped_bounds = "lr_g:\n      loguniform:\n      - 5.0e-05\n      - 0.001"
    text = text.replace(shipped_bounds, "lr_g: {loguniform: [1e-5, '1e-3']}")
    (project / "params.yaml").write_text(text)
    cfg = load_config("params.yaml")
    assert cfg.train.lr_g == 1e-3
    assert cfg.sweep.space["lr_g"] == {"loguniform": [1e-5, 1e-3]}


def test_a_tracking_server_that_does_not_answer_is_waited_for_in_words(monkeypatch, capsys):
    """A server that accepts the connection and never answers: said at once, given up after a bounded time."""
    import socket

    from pipeline import tracking

    monkeypatch.setattr(tracking, "PROBE_QUIET_S", 1)
    monkeypatch.setattr(tracking, "PROBE_TIMEOUT_S", 2)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        problem = tracking.probe_tracking_server(uri, {})
    assert problem.startswith("cannot be reached") and "timed out" in problem, problem
    assert capsys.readouterr().out == f"MLflow at {uri} has not answered in 1 s; waiting up to 2 s\n"


def test_a_dead_ray_address_is_said_at_once_and_given_up_in_one_line(project, capsys, monkeypatch):
    """ray.address where nothing listens: the wait is said before it starts, and ends in one line."""
    import numpy as np

    from pipeline import cluster

    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 1)
    put_params(project, **{"ray.address": "127.0.0.1:1", "data.datasets": ["mnist"]})
    (project / "data" / "processed").mkdir(parents=True)
    np.savez(project / "data" / "processed" / "mnist.npz", x_train=np.zeros((64, 28, 28), np.uint8),
             y_train=np.arange(64) % 10, x_test=np.zeros((16, 28, 28), np.uint8), y_test=np.arange(16) % 10)
    assert exit_code(["train", "--dataset", "mnist"]) == 1
    captured = capsys.readouterr()
    assert "ray.address = '127.0.0.1:1': nothing answers at 127.0.0.1:1 yet; waiting up to 1 s" in captured.out
    assert len(captured.err.splitlines()) == 1 and "Traceback" not in captured.err
    assert "no Ray cluster answered at 127.0.0.1:1 within 1 s" in captured.err
