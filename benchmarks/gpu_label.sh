#!/usr/bin/env bash
# GPU labeling benchmark (benchmarks/gpu_label.py) on a GPU machine without network access.
#
# Usage, from anywhere:
#   bash benchmarks/gpu_label.sh                      # the full run, about 6-8 minutes on one H200
#   bash benchmarks/gpu_label.sh --device cpu --quick # the smoke test's run: tiny sizes, on a CPU
# Any option of gpu_label.py can be added (--help lists them).
#
# Wheels: if a .whl/ folder exists in the repository root (made here by
# benchmarks/gpu_wheels.sh), its wheels are installed into /tmp/site first, offline, and put on
# PYTHONPATH. Output: $OUT/gpu_label.json and $OUT/gpu_label.log when OUT is set, else
# runs/gpu_label/. PYTHON picks the interpreter (default: python3, the one holding torch there).
set -euo pipefail

# Hard stop a little under the 8 minutes the run is sized for; the Python's own deadline
# (--deadline) normally ends it well before, with every finished step saved.
HARD_LIMIT_SECONDS=470

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" > /dev/null; then
    echo "installing $(ls .whl/*.whl | wc -l) carried wheel(s) into /tmp/site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

out="${OUT:-$root/runs/gpu_label}"
mkdir -p "$out"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
timeout --signal=TERM --kill-after=10 "$HARD_LIMIT_SECONDS" \
    "$python" benchmarks/gpu_label.py --json "$out/gpu_label.json" "$@" 2>&1 | tee "$out/gpu_label.log"
