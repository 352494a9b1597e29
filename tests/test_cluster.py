"""A real two-node Ray cluster on one machine, with an MLflow server: the rule of the cluster, proven.

The head (`ray start --head --num-cpus=1`, its own temp dir) runs where DVC runs.
The second node (1 CPU, at 127.0.0.2) lives in its own mount namespace (`unshare -m`)
where the project's data/, models/ and mlruns/ are empty tmpfs mounts: a worker there
that read the head's files would fail. A 2-worker run puts one worker on each node.
Both nodes share a storage_path directory, and token authentication is on. MLflow runs its
basic-auth app: the driver has the credentials in its environment, the nodes do not (the
pipeline hands them to its workers through the object store), and no store or log holds
the password.

Every process started here is ended by its pid, in a `finally`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest

from helpers import (VENV_BIN, end_process_tree, make_dvc_repo, project_params, read_until, serve_mirror,
                      tool_env, wait_until, write_params)

pytestmark = pytest.mark.integration

REQUIRED = os.environ.get("GANPIPE_REQUIRE_CLUSTER") == "1"
HEAD_ONLY = ("data", "models", "mlruns")  # what the second node must not see
NODE2_IP = "127.0.0.2"
TRAIN_IMAGES = 300  # the synthetic fixture's training split
EPOCHS = 5  # of the train run: a worker is killed after a checkpoint, and epochs remain


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def namespaces_unavailable() -> str | None:
    """Why a private mount namespace with tmpfs mounts cannot be made here, or None when it can."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            probe = subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs",
                                    folder], capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            return "`unshare` is not installed"
        if probe.returncode != 0:
            return f"`unshare -m` + `mount -t tmpfs` are not permitted here: {probe.stderr.strip()}"
    return None


@dataclass
class Cluster:
    base: Path
    repo: Path
    env: dict[str, str]
    address: str
    dashboard: str  # the head's dashboard: where `ray job submit` sends jobs
    tracking_uri: str
    shared: Path  # storage both nodes see
    node2: subprocess.Popen  # `unshare` running the second node's `ray start --block`

    def run(self, args: list[str], check: bool = True, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        process = subprocess.Popen(args, cwd=self.repo, env=env or self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        finally:
            end_process_tree(process)  # dvc's ganpipe and whatever it started, also on a timeout
        result = subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n--- stdout\n"
                                 f"{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}")
        return result

    def node2_processes(self) -> list[psutil.Process]:
        return psutil.Process(self.node2.pid).children(recursive=True)

    def node2_sees(self, relative: str) -> bool:
        """Whether a path of the project exists in the second node's mount namespace."""
        raylet = next(p for p in self.node2_processes() if p.name() == "raylet")
        return Path(f"/proc/{raylet.pid}/root{self.repo / relative}").exists()

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri, registry_uri=self.tracking_uri)

    def write_params(self, name: str, **sections) -> str:
        return write_params(self.repo, name, **sections)


def cluster_params(mirror_url: str, address: str, tracking_uri: str, storage: Path) -> dict:
    params = project_params(
        data={"datasets": ["mnist"], "mirrors": {"mnist": [mirror_url]}, "verify_checksums": False},
        model={"name": "dcgan", "channels": 8, "latent_dim": 16},
        # Epochs long enough (1000 samples scored each) that a worker is killed while the run still trains.
        train={"epochs": EPOCHS, "batch_size": 64, "eval_samples": 1000, "log_every": 2},
        evaluator={"epochs": 3, "batch_size": 32},
        ray={"address": address, "num_workers": 2, "use_gpu": False, "max_failures": 2,
             "storage_path": str(storage / "ray_results")},
        mlflow={"tracking_uri": tracking_uri},
    )
    params["sweep"] = {**params["sweep"], "dataset": "mnist", "space": {"lr_d": [2e-4, 1e-3]}, "num_samples": 1,
                       "scheduler": "asha", "metric": "fid", "epochs": 2, "grace_period": 1,
                       "reduction_factor": 2, "num_workers": 1, "max_concurrent_trials": 2, "seed": 0}
    return params


PASSWORD = f"pw-{secrets.token_hex(12)}"  # what must appear in no store and no log
CREDENTIALS = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": PASSWORD}


def auth_server_env(folder: Path) -> dict[str, str]:
    """MLflow's basic-auth app (docs/cluster-auth.md): its user store, the first admin's password, a CSRF key."""
    config = folder / "basic_auth.ini"
    config.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                      f"database_uri = sqlite:///{folder / 'basic_auth.db'}\nadmin_username = admin\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}


def mlflow_healthy(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/health", timeout=2).close()
        return True
    except OSError:
        return False


WAIT_FOR_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="error")
deadline = time.monotonic() + 90
while sum(n["Alive"] for n in ray.nodes()) < int(sys.argv[2]):
    if time.monotonic() > deadline:
        sys.exit(f"the cluster did not reach {sys.argv[2]} nodes")
    time.sleep(0.5)
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = namespaces_unavailable()
    if why:
        if REQUIRED:
            pytest.fail(f"GANPIPE_REQUIRE_CLUSTER=1 but {why}")
        pytest.skip(why)
    base = tmp_path_factory.mktemp("cluster")
    shared = base / "shared"
    gcs_port, mlflow_port, dashboard_port = free_port(), free_port(), free_port()
    address, tracking_uri = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{mlflow_port}"
    # One token for the whole cluster, as on a real one (README: token authentication).
    env = {**tool_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    (base / "server").mkdir()
    server_env = {**env, **auth_server_env(base / "server")}
    with ExitStack() as stack:
        # Only the driver's side holds the credentials: the commands the tests run and this test process.
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        for key, value in CREDENTIALS.items():
            patch.setenv(key, value)
        mirror = stack.enter_context(serve_mirror())
        repo = make_dvc_repo(base / "repo", cluster_params(mirror.url, address, tracking_uri, shared))
        for folder in HEAD_ONLY:
            (repo / folder).mkdir(exist_ok=True)

        # The cluster's own processes (Ray Train's placement-group cleaner) find it through RAY_ADDRESS,
        # as they would through the address file `ray start` leaves in the default temp dir.
        node_env = {**env, "RAY_ADDRESS": address}

        def start(name: str, args: list[str], process_env: dict | None = None) -> subprocess.Popen:
            log = (base / f"{name}.log").open("w")
            process = subprocess.Popen(args, cwd=base, env=process_env or node_env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            stack.callback(end_process_tree, process)
            stack.callback(log.close)
            return process

        server = start("mlflow", [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1",
                                  "--port", str(mlflow_port), "--workers", "1",
                                  "--backend-store-uri", f"sqlite:///{base / 'server' / 'mlflow.db'}",
                                  "--artifacts-destination", str(base / "server" / "artifacts"),
                                  "--app-name", "basic-auth"], server_env)
        # Ray's temp dirs hold AF_UNIX sockets (at most 107 bytes of path): keep them short, not in
        # pytest's ever-longer numbered folders.
        ray_temp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ganpipe-ray-", ignore_cleanup_errors=True)))
        ray_start = [str(VENV_BIN / "ray"), "start", "--block", "--num-cpus=1", "--disable-usage-stats"]
        head = start("head", [*ray_start, "--head", f"--port={gcs_port}", f"--temp-dir={ray_temp / 'head'}",
                              f"--ray-client-server-port={free_port()}", f"--dashboard-port={dashboard_port}",
                              f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"])
        # `ray start` says so once its node is registered; a second node may only join after that.
        wait_until(lambda: "Ray runtime started" in (base / "head.log").read_text(), 120, "the head node", head)
        mounts = " && ".join(f"mount -t tmpfs tmpfs {repo / folder}" for folder in HEAD_ONLY)
        node2 = start("node2", ["unshare", "-m", "--propagation", "private", "sh", "-c",
                                f"{mounts} && exec {' '.join(ray_start)} --address={address} "
                                f"--node-ip-address={NODE2_IP} --temp-dir={ray_temp / 'node2'} "
                                f"--dashboard-agent-listen-port={free_port()} "
                                f"--metrics-export-port={free_port()}"])
        subprocess.run([sys.executable, "-c", WAIT_FOR_NODES, address, "2"], env=env, check=True, timeout=150)
        wait_until(lambda: mlflow_healthy(tracking_uri), 60, "the MLflow server", server)
        yield Cluster(base, repo, {**env, **CREDENTIALS}, address, f"http://127.0.0.1:{dashboard_port}", tracking_uri,
                      shared, node2)


@pytest.fixture(scope="module")
def evaluated(cluster) -> Cluster:
    """The head has the processed data and the evaluator (DVC outputs); the second node has neither."""
    cluster.run(["dvc", "repro", "evaluator@mnist"])
    assert (cluster.repo / "data/processed/mnist.npz").exists()
    assert not cluster.node2_sees("data/processed/mnist.npz") and not cluster.node2_sees("models/evaluator")
    return cluster


def runs_on_server(cluster: Cluster) -> list:
    client = cluster.client()
    experiment = client.get_experiment_by_name("ganpipe-mnist")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_train_on_two_nodes_end_to_end_through_a_killed_worker(evaluated):
    """`dvc repro train@mnist` with one worker per node; the second node's worker is SIGKILLed after a
    checkpoint, and the restarted group resumes from it in shared storage: the stage still ends whole."""
    cluster = evaluated
    process = subprocess.Popen(["dvc", "repro", "train@mnist"], cwd=cluster.repo, env=cluster.env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen: list[str] = []
    try:
        # Kill only once the product says Ray registered a checkpoint: the restarted group must resume from it.
        saved = int(read_until(process, r"checkpoint of epoch (\d+) saved", seen).group(1))
        workers = [p for p in cluster.node2_processes() if "RayTrainWorker" in " ".join(p.cmdline())]
        assert len(workers) == 1, "one of the two workers runs on the second node"
        workers[0].send_signal(signal.SIGKILL)
        output, _ = process.communicate(timeout=600)
        output = "".join(seen) + output
    finally:
        end_process_tree(process)
    assert process.returncode == 0, output[-5000:]
    assert f"epoch {EPOCHS}/{EPOCHS}" in output

    summary = json.loads((cluster.repo / "metrics/train/mnist.json").read_text())  # DVC outputs on the head
    assert summary["status"] == "completed" and summary["epoch"] == EPOCHS and summary["fid"] > 0
    for output_file in ("models/mnist/generator.pt", "models/mnist/checkpoint.pt", "plots/samples/mnist.png",
                        "metrics/mnist/train.json"):
        assert (cluster.repo / output_file).stat().st_size > 0, output_file
    assert list(pd.read_csv(cluster.repo / "plots/quality/mnist.csv")["epoch"]) == list(range(1, EPOCHS + 1))
    assert not cluster.node2_sees("models/mnist")

    client = cluster.client()
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["dvc.stage"] == "train@mnist"
    # From that checkpoint (or a later one registered before the kill landed), not from scratch.
    assert saved <= int(run.data.tags["ganpipe.resumed_from_epoch"]) <= saved + 1, output[-5000:]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "quality/fid")) == \
        list(range(1, EPOCHS + 1))
    assert client.get_metric_history(run.info.run_id, "loss/d")
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert sum("samples" in path for path in images) >= EPOCHS  # a grid per epoch, uploaded through the server
    assert {"checkpoint", "reference", "images"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    versions = client.search_model_versions("name='ganpipe-mnist-generator'")
    assert run.info.run_id in {version.run_id for version in versions}


def test_sweep_on_two_nodes_submitted_as_a_ray_job(evaluated, tmp_path_factory):
    """`dvc repro sweep` as docs/dvc-mlflow-ray.md submits it to a running cluster: `ray job submit` runs the driver
    on the head; the MLflow credentials come from a file on the head, never through the job's runtime env."""
    cluster = evaluated
    head_secrets = tmp_path_factory.mktemp("head-secrets")  # outside every folder the password test reads
    credentials = head_secrets / "mlflow.env"
    credentials.write_text("".join(f"export {key}='{value}'\n" for key, value in CREDENTIALS.items()))
    credentials.chmod(0o600)
    job_env = {key: value for key, value in cluster.env.items() if key not in CREDENTIALS}
    result = cluster.run([str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--", "bash", "-c",
                          f"cd {cluster.repo} && . {credentials} && dvc repro sweep"], env=job_env)
    assert "Job 'raysubmit_" in result.stdout and "succeeded" in result.stdout
    # A one-worker trial trains in its own 1-CPU Tune process: two 1-CPU nodes hold both trials at once.
    assert "the cluster holds" not in result.stdout

    table = pd.read_csv(cluster.repo / "sweep/results.csv")
    assert len(table) == 2 and set(table["status"]) <= {"completed", "stopped_early"}
    assert table["fid"].notna().all()
    summary = json.loads((cluster.repo / "sweep/summary.json").read_text())
    assert summary["trials"] == 2 and summary["failed"] == 0

    runs = runs_on_server(cluster)
    parent = next(r for r in runs if r.info.run_name.startswith("sweep-mnist-"))
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and {child.info.status for child in children} == {"FINISHED"}
    assert {child.info.run_id for child in children} == set(table["mlflow_run_id"])
    for child in children:
        assert cluster.client().get_metric_history(child.info.run_id, "quality/fid")


BAD_SETTINGS = {
    "storage_not_shared": ({"ray": {"storage_path": "models/ray_results"}}, "train",
                           [f"ray.storage_path = '{{repo}}/models/ray_results' is not shared: the node at {NODE2_IP}",
                            "NFS", "s3://"]),
    "sqlite_store": ({"mlflow": {"tracking_uri": None}}, "train",
                     ["mlflow.tracking_uri: 'sqlite:///", "any of the cluster's 2 nodes", "http://"]),
    "batch_not_divisible": ({"train": {"batch_size": 63}}, "train",
                            ["train.batch_size = 63 cannot be split evenly over ray.num_workers = 2"]),
    "batch_below_workers": ({"train": {"batch_size": 1}}, "train",
                            ["train.batch_size = 1 cannot be split evenly over ray.num_workers = 2"]),
    "batch_over_shard": ({"train": {"batch_size": 400}}, "train",
                         [f"more than its shard of {TRAIN_IMAGES // 2} training images"]),
    "too_many_workers": ({"ray": {"num_workers": 3}, "train": {"batch_size": 66}}, "train",
                         ["ray.num_workers: a run needs 3 worker(s) of 1 CPU", "can never hold it", NODE2_IP]),
    "gpus_on_cpu_cluster": ({"ray": {"use_gpu": True}}, "train",
                            ["ray.num_workers: a run needs 2 worker(s) of 1 GPU", "set ray.use_gpu: false"]),
    "sweep_trial_share": ({"sweep": {"num_workers": 2}}, "sweep",
                          ["sweep.num_workers: a run needs 2 worker(s) of 1 CPU plus the Tune trial's own 0.01 CPU"]),
}


# Every bad setting through the CLI's own entry point, one after another in one process: each must stop before
# training with its one line, and a process (with its torch, Ray and MLflow imports) per case would cost minutes.
EACH_CASE = """
import contextlib, io, json, sys
from pipeline.cli import main
results = {}
for case, args in json.loads(sys.argv[1]).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    results[case] = {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
with open(sys.argv[2], "w") as results_file:
    json.dump(results, results_file)
"""


@pytest.fixture(scope="module")
def bad_setting_results(evaluated) -> tuple[dict, int, int]:
    """Each case's return code and output; the server's run count before and after all of them."""
    cluster = evaluated
    commands = {}
    for case, (sections, stage, _) in BAD_SETTINGS.items():
        params = cluster.write_params(f"{case}.yaml", **sections)
        commands[case] = ["--params", params, stage] + (["--dataset", "mnist"] if stage == "train" else [])
    runs_before = len(runs_on_server(cluster))
    results_file = cluster.base / "bad_settings.json"
    cluster.run([sys.executable, "-c", EACH_CASE, json.dumps(commands), str(results_file)], timeout=300)
    return json.loads(results_file.read_text()), runs_before, len(runs_on_server(cluster))


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_bad_cluster_setting_stops_before_training(evaluated, bad_setting_results, case):
    cluster = evaluated
    _, stage, messages = BAD_SETTINGS[case]
    results, runs_before, runs_after = bad_setting_results
    result = results[case]
    assert result["returncode"] == 1, result["stdout"][-3000:] + result["stderr"][-3000:]
    error = [line for line in result["stderr"].splitlines()
             if line.startswith(f"ganpipe {stage}: error: params.yaml:")]
    assert len(error) == 1, result["stderr"][-3000:]
    for message in messages:
        assert message.format(repo=cluster.repo) in error[0]
    assert "Traceback" not in result["stderr"] and "epoch 1/" not in result["stdout"]
    assert runs_after == runs_before  # no MLflow run created, so none left RUNNING


BAD_CREDENTIALS = {
    "wrong_password": ({"MLFLOW_TRACKING_PASSWORD": "not-the-password"},
                       "refused MLFLOW_TRACKING_PASSWORD for MLFLOW_TRACKING_USERNAME"),
    "no_password": ({"MLFLOW_TRACKING_PASSWORD": None},
                    "asks for credentials and MLFLOW_TRACKING_PASSWORD is not set in the environment"),
}


@pytest.mark.parametrize("case", BAD_CREDENTIALS)
def test_missing_or_wrong_mlflow_password_stops_before_any_run(evaluated, case):
    cluster = evaluated
    changes, message = BAD_CREDENTIALS[case]
    env = {key: value for key, value in {**cluster.env, **changes}.items() if value is not None}
    runs_before = len(runs_on_server(cluster))
    process = subprocess.run(["ganpipe", "train", "--dataset", "mnist"], cwd=cluster.repo, env=env, text=True,
                             capture_output=True, timeout=300)
    assert process.returncode == 1, process.stdout[-3000:] + process.stderr[-3000:]
    (error,) = [line for line in process.stderr.splitlines() if line.startswith("ganpipe train: error:")]
    assert f"MLflow at {cluster.tracking_uri} {message}" in error and "Traceback" not in process.stderr
    assert len(runs_on_server(cluster)) == runs_before


def test_the_password_is_in_no_store_and_no_log(evaluated):
    """After the runs above: the server's store, the project (params, outputs, Ray runs, spools) and every log."""
    cluster = evaluated
    assert runs_on_server(cluster), "runs were logged with the password"
    leaks = []
    ray_temp = Path(tempfile.gettempdir()).glob("ganpipe-ray-*")  # Ray's sessions: logs, runtime envs
    for folder in (cluster.base, cluster.repo, cluster.shared, *ray_temp):
        for path in folder.rglob("*"):
            try:
                if path.is_file() and not path.is_symlink() and PASSWORD.encode() in path.read_bytes():
                    leaks.append(str(path))
            except OSError:  # a socket, a file that went away
                pass
    assert not leaks, leaks
