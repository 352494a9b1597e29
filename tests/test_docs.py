"""README.md and docs/*.md: their links resolve, the commands they show parse, and `make demo` is wired.

Fast (no Ray, no training): links are checked against the files and their headings,
`ganpipe ...` lines against the CLI's own parser, `-S key=value` overrides against
pipeline/config.py's validation, and the demo against its preset and `make -n demo`.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import REPO_ROOT
from pipeline.cli import build_parser
from pipeline.config import ConfigError, apply_overrides, load_config, read_params, validate
from pipeline.presets import apply_preset
from pipeline.progress import trial_count

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
OVERRIDE = re.compile(r"-S\s+(?:'([^']*)'|\"([^\"]*)\"|([^\s`'\"]+))")
SHELL = {"bash", "sh", "shell", "console"}


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO_ROOT))


def prose(text: str) -> str:
    """The page without its fenced code blocks: links there are examples, not links."""
    return FENCE.sub("", text)


def shell_lines(text: str) -> list[str]:
    """Command lines of the page's bash blocks, continuation lines joined."""
    lines = []
    for language, body in FENCE.findall(text):
        if language in SHELL:
            lines += body.replace("\\\n", " ").splitlines()
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+)$", prose(page.read_text()), re.M):
        base = slug(heading)
        out.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return out


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_points_to_a_file_and_heading_that_exist(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page_id(page)}: " + "; ".join(broken)


def test_the_readme_is_a_door_with_the_test_command_and_a_link_per_topic():
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert "make test" in shell_lines(readme)  # CI runs the README's test command
    for topic in ("cluster", "tracking", "sweeps", "resume", "quality", "benchmarks", "recipes", "testing",
                  "gpu", "conditional", "tracking-outages", "architecture", "errors", "dvc-mlflow-ray"):
        assert f"](docs/{topic}.md)" in readme, topic


def ganpipe_commands() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for line in shell_lines(page.read_text()):
            words = shlex.split(line, comments=True)
            if words and Path(words[0]).name == "ganpipe":
                out.append((page_id(page), line.strip()))
    return out


COMMANDS = ganpipe_commands()


def test_the_pages_show_ganpipe_commands():
    shown = {shlex.split(line, comments=True)[1] for _, line in COMMANDS}
    assert {"train", "sample", "evaluate", "ui"} <= shown


@pytest.mark.parametrize("page,line", COMMANDS, ids=[f"{page}: {line[:60]}" for page, line in COMMANDS])
def test_every_ganpipe_command_shown_parses_with_the_cli_parser(page, line):
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            build_parser().parse_args(shlex.split(line, comments=True)[1:])
        except SystemExit:
            pytest.fail(f"{page}: `{line}` does not parse: {errors.getvalue().strip().splitlines()[-1]}")


def dvc_commands() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for line in shell_lines(page.read_text()):
            words = shlex.split(line, comments=True)
            while "&&" in words:  # each command of `a && b`
                words = words[words.index("&&") + 1:]
            if words and Path(words[0]).name == "dvc":
                out.append((page_id(page), shlex.join(words)))
    return out


DVC_COMMANDS = dvc_commands()


def test_the_pages_show_the_dvc_experiment_loop_and_a_remote():
    shown = {" ".join(shlex.split(line)[1:3]) for _, line in DVC_COMMANDS}
    assert {"remote add", "exp show", "exp apply", "exp branch", "metrics diff"} <= shown, shown


@pytest.mark.parametrize("page,line", DVC_COMMANDS, ids=[f"{page}: {line[:60]}" for page, line in DVC_COMMANDS])
def test_every_dvc_command_shown_parses_with_dvcs_parser(page, line):
    from dvc.cli import DvcParserError, parse_args

    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            parse_args(shlex.split(line)[1:])
        except (SystemExit, DvcParserError):
            pytest.fail(f"{page}: `{line}` does not parse: {errors.getvalue().strip().splitlines()[-1:]}")


def overrides_in(text: str) -> list[str]:
    return [next(filter(None, groups)) for groups in OVERRIDE.findall(text)]


def parse_override(text: str) -> dict:
    """`-S key=value` as dvc exp run sets it: the value read as YAML."""
    key, _, value = text.partition("=")
    return {key: yaml.safe_load(value)}


# The overrides of one line go together, as one `dvc exp run` applies them.
OVERRIDES = sorted({(page_id(page), tuple(found)) for page in PAGES
                    for line in page.read_text().replace("\\\n", " ").splitlines() if (found := overrides_in(line))})


def test_the_pages_show_overrides():
    assert len(OVERRIDES) >= 10


@pytest.mark.parametrize("page,overrides", OVERRIDES, ids=[f"{page}: {' '.join(items)}" for page, items in OVERRIDES])
def test_every_dvc_override_shown_names_a_key_the_config_accepts(page, overrides):
    raw = read_params(REPO_ROOT / "params.yaml")
    for override in overrides:
        assert re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+=.*|preset=.*", override), f"{page}: -S {override}"
        raw = apply_overrides(raw, parse_override(override))
    try:
        validate(apply_preset(raw, REPO_ROOT))
    except ConfigError as err:
        pytest.fail(f"{page}: -S {' -S '.join(overrides)}: {err}")


def test_an_unknown_key_is_caught_by_the_same_check():
    raw = apply_overrides(read_params(REPO_ROOT / "params.yaml"), parse_override("train.lr_gen=0.001"))
    with pytest.raises(ConfigError, match="unknown key 'train.lr_gen'"):
        validate(raw)


# ---------------------------------------------------------------- benchmarks/recipes.py


def recipes_commands() -> list[tuple[str, str]]:
    return [(page_id(page), line.strip()) for page in PAGES for line in shell_lines(page.read_text())
            if "benchmarks/recipes.py" in line]


RECIPES = recipes_commands()


@pytest.mark.parametrize("page,line", RECIPES, ids=[f"{page}: {line[-60:]}" for page, line in RECIPES])
def test_every_recipes_command_shown_names_rows_that_exist_with_valid_settings(page, line):
    import sys

    if str(REPO_ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from recipes import build_parser as recipes_parser
    from recipes import plan_of

    words = shlex.split(line, comments=True)
    args = recipes_parser().parse_args(words[words.index("benchmarks/recipes.py") + 1:])
    try:
        _, plan = plan_of(args)
    except SystemExit as err:
        pytest.fail(f"{page}: {err}")
    for name, params in plan.items():
        try:
            validate(params)
        except ConfigError as err:
            pytest.fail(f"{page}: row {name}: {err}")


def test_the_pages_show_recipes_commands():
    assert len(RECIPES) >= 3


# ---------------------------------------------------------------- benchmark commands write outside the repository

# Each benchmark's options that name what it writes; a script not listed writes nothing but its output on the console.
WRITES = {"recipes.py": ["--out-dir"], "gpu_check.py": ["--out"], "gpu_pipeline.py": ["--json", "--out"],
          "overhead.py": ["--out"], "scaling.py": ["--out"], "sweep_realdata.py": ["--out"], "ui_store.py": ["--out"],
          "throughput.py": ["--out"], "quality_floor.py": ["--out"],
          "spool_outage.py": ["--out"], "make_demo.py": ["--out"], "suite_time.py": ["--out"]}
PRINTS_ONLY = {"real_mnist.py", "gpu_pipeline.sh"}


def benchmark_commands() -> list[tuple[str, str]]:
    return [(page_id(page), line.strip()) for page in PAGES for line in shell_lines(page.read_text())
            if re.search(r"benchmarks/\w+\.(py|sh)\b", line)]


BENCHMARKS = benchmark_commands()


def outside_the_repository(value: str) -> bool:
    """A placeholder (OUT, $OUT, DIR/...) or an absolute path that is not inside the project."""
    if re.match(r"\$?[A-Z][A-Z_]*\b", value):
        return True
    path = Path(value)
    return path.is_absolute() and REPO_ROOT.resolve() not in path.resolve().parents


@pytest.mark.parametrize("page,line", BENCHMARKS, ids=[f"{page}: {line[:60]}" for page, line in BENCHMARKS])
def test_every_benchmark_command_shown_writes_outside_the_repository(page, line):
    words = shlex.split(line, comments=True)
    script = next(Path(word).name for word in words if re.match(r"benchmarks/\w+\.(py|sh)$", word))
    assert script in WRITES or script in PRINTS_ONLY, f"{page}: {script}: say what it writes (WRITES or PRINTS_ONLY)"
    for option in WRITES.get(script, []):
        if option == "--out" and script == "gpu_pipeline.py" and option not in words:
            continue  # its scratch folder defaults to /tmp
        assert option in words, f"{page}: `{line}` does not name {option}: it would write into the repository"
        value = words[words.index(option) + 1]
        assert outside_the_repository(value), f"{page}: `{line}`: {option} {value} is inside the repository"


def test_the_pages_show_benchmark_commands():
    assert len(BENCHMARKS) >= 5


OUTPUT_OPTIONS = [(script, option) for script, options in WRITES.items() for option in options
                  if (script, option) != ("gpu_pipeline.py", "--out")]  # its scratch folder defaults to /tmp


@pytest.mark.parametrize("script,option", OUTPUT_OPTIONS)
def test_no_benchmark_writes_into_the_repository_by_default(script, option):
    """Every output option of a benchmark is required: run without it, the script stops before it writes."""
    found = re.search(rf"add_argument\(\"{option}\"[^)]*\)", (REPO_ROOT / "benchmarks" / script).read_text())
    assert found, f"{script}: no {option}"
    assert "required=True" in found.group(0), f"{script}: {option} has a default"


# ---------------------------------------------------------------- make demo


@pytest.fixture(scope="module")
def demo_command() -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # -n prints the recipe without running it (nor the setup, when .venv is stale).
    out = subprocess.run(["make", "-n", "demo"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if "dvc exp run" in line]
    assert len(lines) == 1, out
    return lines[0]


def test_make_demo_runs_every_stage_as_a_dvc_experiment(demo_command):
    words = shlex.split(demo_command.split("dvc exp run", 1)[1].split(";")[0])
    # Only -S options: no stage named, so every stage of dvc.yaml runs.
    assert words and all(word == "-S" for word in words[::2]), words
    assert "params.yaml" in Path(REPO_ROOT / "Makefile").read_text().split("demo:")[1]  # put back afterwards


def test_the_demo_configuration_is_small_and_valid(demo_command):
    overrides = {}
    for item in overrides_in(demo_command):
        overrides.update(parse_override(item))
    assert overrides["preset"] == "demo"
    cfg = load_config(REPO_ROOT / "params.yaml", overrides)
    assert cfg.data.datasets == ["mnist"] and cfg.sweep_dataset == "mnist"
    assert cfg.data.train_images == 10_000
    assert cfg.evaluator.epochs <= 2
    assert cfg.data.mirrors == load_config(REPO_ROOT / "params.yaml").data.mirrors  # params.yaml's mirrors
    assert cfg.model.name == "dcgan" and cfg.model.channels <= 32
    assert cfg.train.epochs <= 6 and cfg.train.eval_samples <= 2000
    grid = cfg.sweep.scheduler != "pbt" and cfg.sweep.search == "random"
    assert 2 <= trial_count(cfg.sweep.space, cfg.sweep.num_samples, grid) <= 4
    assert cfg.sweep.epochs == 1


def test_a_mirror_override_reaches_the_demo(demo_command):
    overrides = {}
    for item in [*overrides_in(demo_command), "data.mirrors.mnist=[/data/mnist]"]:
        overrides.update(parse_override(item))
    assert load_config(REPO_ROOT / "params.yaml", overrides).data.mirrors["mnist"] == ["/data/mnist"]


PAGE_REF = re.compile(r"\b(?:docs/)?[\w-]+\.md\b|README: [^)\"]+")


def test_every_page_the_code_names_exists():
    """A message, comment or docstring that sends the reader to a page (docs/x.md, README: Heading) finds it."""
    headings = set(re.findall(r"^#+ (.+)$", (REPO_ROOT / "README.md").read_text(), re.M))
    missing = []
    for source in sorted(p for folder in ("gan", "pipeline", "benchmarks") for p in (REPO_ROOT / folder).glob("*.py")):
        for ref in PAGE_REF.findall(source.read_text()):
            found = ref[len("README: "):] in headings if ref.startswith("README: ") else (REPO_ROOT / ref).exists()
            if not found:
                missing.append(f"{source.relative_to(REPO_ROOT)}: {ref}")
    assert not missing, missing


# ---------------------------------------------------------------- figures tables rendered from JSON


def test_every_figures_table_is_what_its_json_renders_to():
    """A table between `<!-- table: name -->` markers is docs/tables.py's rendering of its committed JSON."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("doc_tables", REPO_ROOT / "docs" / "tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    assert sum(len(tables.BLOCK.findall(page.read_text())) for page in tables.PAGES) >= 2
    stale = [item for page in tables.PAGES for item in tables.stale_blocks(page)]
    assert not stale, f"run `python docs/tables.py`: {stale}"


# ---------------------------------------------------------------- the suite's own layout (docs/testing.md)


def test_under_xdist_a_module_is_one_group(request):
    """`make test` runs each module on one pytest-xdist worker (--dist loadgroup), so its fixtures are built once;
    xdist names the group in the test's id. (Under pytest 9 it could not: every test was a group of its own.)"""
    if not getattr(request.config.option, "loadgroup", False):  # set on the workers of --dist loadgroup
        pytest.skip("not run by pytest-xdist with --dist loadgroup")
    assert request.node.nodeid.endswith("@test_docs"), request.node.nodeid
