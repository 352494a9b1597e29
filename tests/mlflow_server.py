"""A real `mlflow server` for tests: a subprocess on a free loopback port, stopped and restarted by its pid."""

from __future__ import annotations

import socket
import subprocess
import urllib.request
from pathlib import Path

import psutil

from helpers import VENV_BIN, end_process_tree, tool_env, wait_until


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """One store (SQLite + artifacts in ``folder``) served on one port; ``stop()``/``start()`` make an outage."""

    def __init__(self, folder: Path, *, app_name: str | None = None, env: dict | None = None):
        self.folder, self.app_name, self.env = Path(folder), app_name, env or {}
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.log = self.folder / "server.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def start(self, timeout: float = 180) -> "MlflowServer":
        command = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
                   "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1"]
        if self.app_name:
            command += ["--app-name", self.app_name]
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
                                            env={**tool_env(), **self.env}, start_new_session=True)
        wait_until(self.healthy, timeout, f"mlflow server on port {self.port}", self.process)
        return self

    def kill(self) -> None:
        """SIGKILL the server and its workers, each by pid: a crash, not a shutdown."""
        if self.process is None:
            return
        for process in [*psutil.Process(self.process.pid).children(recursive=True), psutil.Process(self.process.pid)]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            end_process_tree(self.process)
            self.process = None
