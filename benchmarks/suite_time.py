"""The test suite's time, as the README's test command runs it: `make test`, on this machine.

    python benchmarks/suite_time.py --out OUT/suite.json

runs `make test` in the repository (set up first when .venv is missing) and writes
what pytest reported: seconds, passed, failed, skipped, with the machine and the date.
docs/tables.py renders the README's and docs/testing.md's figure from the JSON.
The browser test and the two-node cluster test must run, not skip: it sets
GANPIPE_REQUIRE_BROWSER and GANPIPE_REQUIRE_CLUSTER as CI does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"=+ (.*) in ([\d.]+)s")
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write (outside the repository)")
    args = parser.parse_args()
    env = {**os.environ, "GANPIPE_REQUIRE_BROWSER": "1", "GANPIPE_REQUIRE_CLUSTER": "1"}
    done = subprocess.run(["make", "test"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    print(done.stdout[-3000:], done.stderr[-2000:])
    found = SUMMARY.findall(done.stdout)
    if not found:
        raise SystemExit("make test printed no pytest summary")
    outcome, seconds = found[-1]
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in COUNT.findall(outcome)}
    result = {"date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()}-core CPU, no GPU",
              "command": "make test", "seconds": float(seconds), "passed": counts.get("passed", 0),
              "failed": counts.get("failed", 0) + counts.get("error", 0), "skipped": counts.get("skipped", 0)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    raise SystemExit(done.returncode)


if __name__ == "__main__":
    main()
