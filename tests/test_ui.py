"""The path users take to compare runs: `ganpipe ui` over a real store, driven in headless Chromium.

The store comes from the real train run and the real sweep of ``swept_repo``, or,
with GANPIPE_UI_STORE=<repository>, from a project where both ran on real data
(benchmarks/ui_store.py makes one). Screenshots land in the test's tmp folder; with
GANPIPE_UPDATE_DOCS=1 they also refresh docs/, where the README's walkthrough
shows them: refresh them from a real store, not from the synthetic fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import REPO_ROOT, tool_env
from pipeline.tracking import TRAINING_VIEW

pytestmark = pytest.mark.integration

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("GANPIPE_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required (Debian: apt-get install chromium chromium-driver)")
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # No internet here: background networking would only make failing connections.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1600,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


REAL_STORE = os.environ.get("GANPIPE_UI_STORE")


@pytest.fixture(scope="module")
def ui(request):
    repo = Path(REAL_STORE) if REAL_STORE else request.getfixturevalue("swept_repo")[0]
    port = free_port()
    process = subprocess.Popen(["ganpipe", "ui", "--port", str(port)], cwd=repo, env=tool_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert process.poll() is None and time.time() < deadline, "ganpipe ui did not come up"
                time.sleep(0.5)
        yield base, repo, process
    finally:
        process.terminate()
        process.wait(timeout=30)


def api(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request).read())


def show(driver, url: str, expected: list[str], screenshot: str, tmp_path: Path, prepare=None) -> str:
    """Open url, wait until every expected string is on the page, prepare(driver), save a screenshot; the page text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    body = lambda: driver.find_element(By.TAG_NAME, "body").text
    try:
        WebDriverWait(driver, 60).until(lambda _: all(text in body() for text in expected))
        if prepare:
            prepare(driver)
    finally:
        driver.save_screenshot(str(tmp_path / screenshot))
    if os.environ.get("GANPIPE_UPDATE_DOCS"):
        (REPO_ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(tmp_path / screenshot, REPO_ROOT / "docs" / screenshot)
    return body()


def close_assistant(driver, base: str) -> None:
    """Keep MLflow's assistant panel shut: it would cover a third of every picture."""
    driver.get(base)
    driver.execute_script("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                          "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');")


def search_charts(text: str):
    """Filter a run's metric charts, e.g. to the quality ones."""
    from selenium.webdriver.common.by import By

    def prepare(driver):
        driver.find_element(By.CSS_SELECTOR, "input[placeholder='Search metric charts']").send_keys(text)
        time.sleep(1)  # the charts re-layout

    return prepare


def plot_metric(metric: str):
    """Make the compare page's parallel-coordinates plot show ``metric`` (it starts on the first shared one)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def prepare(driver):
        metrics = driver.find_elements(By.CSS_SELECTOR, ".du-bois-light-select-multiple")[1]  # Parameters, Metrics
        for remove in metrics.find_elements(By.CSS_SELECTOR, ".du-bois-light-select-selection-item-remove"):
            remove.click()
        metrics.click()
        option = f".du-bois-light-select-item-option[title='{metric}']"
        for _ in range(50):  # the option list is virtual: scroll until the metric is drawn
            found = driver.find_elements(By.CSS_SELECTOR, option)
            if found:
                found[0].click()
                break
            driver.execute_script("document.querySelector('.rc-virtual-list-holder').scrollTop += 150")
        metrics.find_element(By.TAG_NAME, "input").send_keys("\ue00c")  # Escape closes the list
        WebDriverWait(driver, 10).until(lambda _: metric in metrics.text)

    return prepare


def runs_of(base: str) -> tuple[str, dict, list[dict]]:
    found = json.loads(urllib.request.urlopen(
        f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ganpipe-mnist").read())["experiment"]
    runs = api(base, "runs/search", {"experiment_ids": [found["experiment_id"]], "max_results": 100})["runs"]
    tags = lambda run: {t["key"]: t["value"] for t in run["data"].get("tags", [])}
    (train,) = [r for r in runs if tags(r).get("dvc.stage") == "train@mnist"]
    children = [r for r in runs if "mlflow.parentRunId" in tags(r)]
    return found["experiment_id"], train, children


def printed_link(process, name: str) -> str:
    """The link `ganpipe ui` printed for an experiment."""
    while True:
        line = process.stdout.readline()
        assert line, "ganpipe ui printed no link for " + name
        if line.strip().startswith(f"{name}: http"):
            return line.split(": ", 1)[1].strip()


def test_ui_shows_experiments_runs_and_a_sweep_comparison(ui, browser, tmp_path):
    base, repo, process = ui
    experiment_id, train, children = runs_of(base)
    close_assistant(browser, base)
    assert len(children) == 4 or (REAL_STORE and children)

    # 1. the link `ganpipe ui` prints opens the runs table in the training view, without a click on
    #    "Model training"; the experiment is marked as model training for MLflow.
    found = json.loads(urllib.request.urlopen(
        f"{base}/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}").read())["experiment"]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in found["tags"]
    link = printed_link(process, "ganpipe-mnist")
    assert link.startswith(f"{base}/#/experiments/{experiment_id}/runs")
    text = show(browser, link, ["Run Name", train["info"]["run_name"]], "ui-experiments.png", tmp_path)
    assert "Traces" not in text.split("Run Name")[1] and "Token Usage" not in text

    # 2. the train run: metric charts grouped by prefix (the picture: the quality ones), one samples grid per epoch
    run_id, run_name = train["info"]["run_id"], train["info"]["run_name"]
    show(browser, f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?{TRAINING_VIEW}",
         [run_name, "loss", "quality", "grad", "speed"], "ui-train-run.png", tmp_path,
         prepare=search_charts("quality/"))
    listing = json.loads(urllib.request.urlopen(
        f"{base}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=images").read())
    grids = sorted((f["path"] for f in listing["files"] if f["path"].endswith(".png")),
                   key=lambda path: int(path.split("+")[2]))
    epochs = len(grids)
    assert epochs >= 2
    assert [path.split("+")[:3] for path in grids] == [["images/samples", "step", str(e)] for e in range(1, epochs + 1)]
    show(browser, f"{base}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{grids[-1]}?{TRAINING_VIEW}",
         [f"samples+step+{epochs}", "checkpoint", "reference"], "ui-train-samples.png", tmp_path)

    # 3. the sweep's children side by side: the FID against their lr and D:G params
    ids = json.dumps([child["info"]["run_id"] for child in children])
    text = show(browser, f"{base}/#/compare-runs?runs={ids}&experiments=[\"{experiment_id}\"]&{TRAINING_VIEW}",
                [f"Comparing {len(children)} Runs", "train.lr_d", "train.lr_g", "train.d_steps", "train.g_steps"],
                "ui-sweep-compare.png", tmp_path, prepare=plot_metric("quality/fid"))
    for child in children:
        assert child["info"]["run_name"] in text
    if not REAL_STORE:
        assert "1e+30" in text  # the diverged trial's lr_d, beside the others


def test_ui_without_a_store_says_how_to_make_one(tmp_path):
    result = subprocess.run(["ganpipe", "ui"], cwd=tmp_path, env=tool_env(), capture_output=True, text=True)
    assert result.returncode == 1
    assert "no MLflow store at" in result.stderr and "dvc repro" in result.stderr
