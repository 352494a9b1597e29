#!/usr/bin/env bash
# Issue 18's GPU run in one command, on a CUDA machine that has torch but no package index (docs/gpu.md).
# From the project root:
#
#   bash benchmarks/gpu_pipeline.sh [MNIST_DIR] [more benchmarks/gpu_pipeline.py options]
#
# Needs .gpu-bundle/site.tar.xz (made where pip reaches an index: ../shared/gpu-bundle/make-bundle.sh .gpu-bundle)
# and MNIST_DIR (default .gpu-data/mnist) with MNIST's four IDX .gz files. Writes gpu_pipeline.json and
# gpu_pipeline.log into $OUT (else the current folder); the table is printed last.
set -euo pipefail
[ -f pyproject.toml ] || { echo "run from the project root" >&2; exit 1; }
data=${1:-.gpu-data/mnist}
[ $# -gt 0 ] && shift
out=${OUT:-$PWD}
site=/tmp/ganpipe-site
mkdir -p "$site" && tar -xJf .gpu-bundle/site.tar.xz -C "$site"   # the bundle header's unpack line
export PYTHONPATH="$site:$PWD" PATH="$site/bin:$PATH" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/gpu_pipeline.py --data "$data" --out "/tmp/ganpipe-gpu-$$" --json "$out/gpu_pipeline.json" "$@" \
  2>&1 | tee "$out/gpu_pipeline.log"
