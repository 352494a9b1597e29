"""What an outage of the tracking server costs rank 0: seconds per MLflow call before, during and after.

Starts a real `mlflow server` (SQLite store in --out), logs one epoch's worth of calls
(a batch of step metrics, the epoch metrics, a 232x232 sample grid) per "epoch" through
``SpooledClient``, kills the server by pid after --epochs epochs, keeps logging as many
epochs while it is down, restarts it and times the delivery of the spool. Writes OUT/spool_outage.json (the figures, the machine, the
date), which docs/tables.py renders into docs/tracking-outages.md.

    python benchmarks/spool_outage.py --out OUT --epochs 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from pipeline import spool, tracking


def healthy(uri: str) -> bool:
    try:
        urllib.request.urlopen(f"{uri}/health", timeout=2).close()
        return True
    except OSError:
        return False


def start_server(folder: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while not healthy(f"http://127.0.0.1:{port}"):
        time.sleep(0.5)
    return server


def epoch(client, run_id: str, number: int) -> float:
    """One epoch's MLflow calls as rank 0 makes them; returns their seconds."""
    started = time.perf_counter()
    tracking.log_metric_rows(client, run_id, [({"loss/d": 0.5, "loss/g": 1.0}, step)
                                              for step in range(number * 100, number * 100 + 20)])
    tracking.log_metrics(client, run_id, {"quality/fid": 10.0 / number, "epoch": number}, step=number)
    client.log_image(run_id, np.zeros((232, 232, 3), np.uint8), key="samples", step=number)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--port", type=int, default=5077)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    uri = f"http://127.0.0.1:{args.port}"
    server = start_server(args.out, args.port)
    try:
        reader = MlflowClient(uri)
        run_id = reader.create_run(reader.create_experiment(f"bench-{time.time():.0f}")).info.run_id
        client = spool.SpooledClient(uri, args.out / "spool")
        up = [epoch(client, run_id, n) for n in range(1, args.epochs + 1)]
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        down = [epoch(client, run_id, n) for n in range(args.epochs + 1, 2 * args.epochs + 1)]
        spooled = len(client.spool.pending())
        server = start_server(args.out, args.port)
        back = time.perf_counter()
        left = client.flush(timeout_s=300)
        delivered_s = time.perf_counter() - back
        client.close()
        steps = sorted(m.step for m in reader.get_metric_history(run_id, "quality/fid"))
        result = {"epoch_calls_s_server_up": round(float(np.median(up)), 3),
                  "first_epoch_calls_s_server_down": round(down[0], 3),
                  "later_epoch_calls_s_server_down": round(float(np.median(down[1:])), 4),
                  "records_spooled": spooled, "delivery_s_after_restart": round(delivered_s, 2),
                  "records_left": left, "fid_steps_complete": steps == list(range(1, 2 * args.epochs + 1)),
                  "epochs": args.epochs, "date": datetime.date.today().isoformat(),
                  "machine": f"{os.cpu_count()}-core CPU, loopback server"}
        (args.out / "spool_outage.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


if __name__ == "__main__":
    main()
