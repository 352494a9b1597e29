#!/usr/bin/env bash
# The GPU run in one command, on a CUDA machine that has torch but no package index (docs/gpu.md).
# From the project root:
#
#   bash benchmarks/gpu_pipeline.sh [MNIST_DIR] [more benchmarks/gpu_pipeline.py options]
#
# Needs .gpu-bundle/site.tar.xz (the project's dependencies other than torch,
# installed into a folder where pip reaches an index and packed as a tar.xz)
# and MNIST_DIR (default .gpu-data/mnist) with MNIST's four IDX .gz files. Writes gpu_pipeline.json and
# gpu_pipeline.log into $OUT (else a new folder under /tmp, named first); the table is printed last.
set -euo pipefail
started=$(date +%s.%N)  # the run's deadline counts from here: unpacking and the preflight are part of it
[ -f pyproject.toml ] || { echo "run from the project root" >&2; exit 1; }
data=${1:-.gpu-data/mnist}
[ $# -gt 0 ] && shift
out=${OUT:-$(mktemp -d /tmp/ganpipe-gpu-pipeline.XXXXXX)}
echo "gpu_pipeline: writing into $out"
site=/tmp/ganpipe-site
export PYTHONPATH="$site:$PWD" PATH="$site/bin:$PATH" PYTHONUNBUFFERED=1
# Unpack (Python's tarfile: no xz needed), then ~5 s of imports and nvidia-smi; what failed lands in the JSON first.
timeout 120 python3 benchmarks/gpu_preflight.py --bundle .gpu-bundle/site.tar.xz --site "$site" \
  --json "$out/gpu_pipeline.json" 2>&1 | tee "$out/gpu_pipeline.log"
python3 benchmarks/gpu_pipeline.py --data "$data" --out "/tmp/ganpipe-gpu-$$" --json "$out/gpu_pipeline.json" \
  --started-at "$started" --preflight "$out/gpu_pipeline.json" "$@" 2>&1 | tee -a "$out/gpu_pipeline.log"
