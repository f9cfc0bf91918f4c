#!/usr/bin/env bash
# One GPU measurement, in one go: the attention kernels' tests compiled for the GPU, then the
# training-speed table (benchmarks/train_speed.py) with a kernel profile of its first variant.
#
#   bash benchmarks/gpu.sh                 # installs evejax[cuda12,test] from the package index
#   WHEELS=.whl bash benchmarks/gpu.sh     # offline machine: its own jax + the wheels in .whl/
#
# Writes gpu.txt, attention_tests.txt and train_speed.md to $OUT (default /tmp/evejax-gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/evejax-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [[ -n "${WHEELS:-}" ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  # The machine's flax may not match the pinned jax API: fall back to the carried one.
  python3 -c 'from evejax.models import EVE' 2>/dev/null || {
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/flax/*.whl
  }
else
  python3 -m pip install -q -e '.[cuda12,test]'
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())' \
  | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py 2>&1 \
  | tee "$OUT/attention_tests.txt" | tail -25
python3 benchmarks/train_speed.py --profile --time_budget="${TIME_BUDGET:-240}" "$@" \
  2> >(tee "$OUT/train_speed.log" >&2) | tee "$OUT/train_speed.md"
