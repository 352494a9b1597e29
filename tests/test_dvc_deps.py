"""dvc.yaml lists what each stage really runs and reads, so `dvc repro` never serves a stale result.

The code: each stage's deps hold the import closure of its pipeline/ module, followed statically (imports inside
functions included: they run too). The params: a real `dvc status` after changing one key (or one source file)
names exactly the stages that read it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from helpers import REPO_ROOT, make_dvc_repo, project_params, run_cmd

PACKAGES = ("gan", "pipeline")


def module_file(name: str) -> Path | None:
    """The project file that defines module ``name``, if it is one of the project's."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = REPO_ROOT / (name.replace(".", "/") + ".py")
    return path if path.exists() else None


def imported_names(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth of its code (``from a import b`` gives a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_closure(module: str) -> set[str]:
    """The project files (relative paths) that running ``module`` may execute."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = module_file(todo.pop())
        if path is not None and path not in seen:
            seen.add(path)
            todo.extend(imported_names(path))
    return {str(path.relative_to(REPO_ROOT)) for path in seen}


def listed_code(deps: list[str]) -> set[str]:
    """The project's .py files a stage's deps name, a folder standing for every file in it."""
    files = set()
    for dep in deps:
        path = REPO_ROOT / dep
        if path.is_dir() and dep.split("/")[0] in PACKAGES:
            files.update(str(p.relative_to(REPO_ROOT)) for p in path.glob("*.py") if p.name != "__init__.py")
        elif dep.endswith(".py"):
            files.add(dep)
    return files


STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_lists_exactly_the_code_it_imports(stage):
    command = STAGES[stage]["cmd"].split()
    assert command[:2] == ["ganpipe", stage], f"{stage}: runs {command[:2]}"
    imported = {f for f in import_closure(f"pipeline.{stage}") if not f.endswith("__init__.py")}
    listed = listed_code(STAGES[stage].get("deps", []))
    assert not imported - listed, f"dvc.yaml's {stage} stage runs these files but does not list them: " \
                                  f"{sorted(imported - listed)}"
    assert not listed - imported, f"dvc.yaml's {stage} stage lists files it does not import: " \
                                  f"{sorted(listed - imported)}"


def fake_outputs(repo: Path, dataset: str) -> None:
    """A file (a folder for data/raw) at every output and metric path of every stage, for `dvc commit`."""
    for spec in STAGES.values():
        for entry in spec.get("outs", []) + spec.get("metrics", []):
            path = repo / (entry if isinstance(entry, str) else next(iter(entry))).replace("${item.dataset}", dataset)
            if path.parent.name == "raw":
                (path / "file").parent.mkdir(parents=True, exist_ok=True)
                (path / "file").write_text("raw")
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}" if path.suffix == ".json" else "x")


# What one change must make stale: a params key (section.key = new value) or a source file (edited).
# Where and how a run is tracked changes no result: those keys make nothing stale.
CHANGES = [
    ("data.mirrors.mnist", ["http://elsewhere/"], {"fetch@mnist"}),
    ("data.verify_checksums", True, {"fetch@mnist"}),
    ("data.train_images", 100, {"preprocess@mnist"}),
    ("evaluator.epochs", 1, {"evaluator@mnist"}),
    ("preset", "wgan-clip", {"train@mnist", "sweep"}),
    ("model.channels", 8, {"train@mnist", "sweep"}),
    ("train.lr_g", 0.5, {"train@mnist", "sweep"}),
    ("ray.num_workers", 3, {"train@mnist"}),
    ("ray.max_workers", 2, {"train@mnist"}),
    ("ray.use_gpu", False, {"train@mnist", "sweep"}),
    ("sweep.epochs", 7, {"sweep"}),
    ("ray.address", "auto", set()),
    ("ray.storage_path", "elsewhere", set()),
    ("mlflow.experiment_prefix", "other", set()),
    ("data.retries", 9, set()),
    ("gan/losses.py", None, {"train@mnist", "sweep"}),
    ("gan/metrics.py", None, {"evaluator@mnist", "train@mnist", "sweep"}),
    ("pipeline/preprocess.py", None, {"preprocess@mnist"}),
    ("pipeline/artifacts.py", None, {"fetch@mnist", "preprocess@mnist", "evaluator@mnist", "train@mnist", "sweep"}),
    ("pipeline/sweep.py", None, {"sweep"}),
    ("presets/wgan-clip.yaml", None, {"train@mnist", "sweep"}),
]


def stale_stages(repo: Path) -> set[str]:
    """What `dvc status` lists, through DVC's own API (a process per check would cost seconds each)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc:
        return {name.rsplit(":", 1)[-1] for name in dvc.status()}  # "<path>/dvc.yaml:train@mnist"


def test_a_change_makes_exactly_the_stages_that_read_it_stale(tmp_path):
    data = {"datasets": ["mnist"], "mirrors": {"mnist": ["http://unused/"]}, "verify_checksums": False}
    params = project_params(data=data)
    repo = make_dvc_repo(tmp_path / "repo", params)
    fake_outputs(repo, "mnist")
    run_cmd(["dvc", "commit", "-f", "-q"], repo)
    assert stale_stages(repo) == set()
    for key, value, expected in CHANGES:
        if value is None:  # a source file
            original = (repo / key).read_text()
            (repo / key).write_text(original + "\n# edited\n")
        else:
            edited = yaml.safe_load(yaml.safe_dump(params))
            *sections, leaf = key.split(".")
            node = edited
            for section in sections:
                node = node[section]
            node[leaf] = value
            (repo / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
        assert stale_stages(repo) == expected, key
        if value is None:
            (repo / key).write_text(original)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stale_stages(repo) == set()
