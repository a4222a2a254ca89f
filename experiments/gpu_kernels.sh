#!/usr/bin/env bash
# Device check of the Pallas attention kernels (issue 3): the compiled-GPU tests (Triton, then
# the Mosaic GPU append and decode variants under their own timeout), then the kernel benchmark (its Mosaic
# rows only if those tests passed). Run from the repo root on the GPU machine (device call with
# carry [".whl"] if the image lacks ml_collections). Writes under $OUT: gpu.txt, env.txt,
#   pytest_gpu.log, junit_gpu.xml, pytest_mosaic.log, kernel_bench.log,
#   kernel_bench/results.{json,md}
set -uo pipefail
OUT=${OUT:-/tmp/statejax_gpu_kernels}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

# `kernels/` is installed as `statejax.kernels` (package-dir mapping in pyproject), so
# PYTHONPATH alone does not find it. An editable install is not reliable offline (it needs
# setuptools >= 70.1 or `wheel` in the image), so link the folder into the package for this
# run instead, and remove the link on exit.
importable() { python3 -c "import statejax.kernels.append_attention" 2>/dev/null; }
if ! importable && [ ! -e statejax/kernels ]; then
  ln -s ../kernels statejax/kernels
  trap 'rm -f statejax/kernels' EXIT
  echo "statejax.kernels: linked statejax/kernels -> ../kernels for this run"
fi
importable || { echo "cannot import statejax.kernels"; exit 1; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; } | tee "$OUT/gpu.txt"
python3 -c "import jax, jax.experimental.pallas.triton as plgpu, statejax.kernels as k; \
from jax._src.lib import cuda_versions as cv; \
print('jax', jax.__version__, jax.devices(), 'CompilerParams' in dir(plgpu), k.__file__, \
'cuda runtime', cv and cv.cuda_runtime_get_version())" | tee "$OUT/env.txt"

# 1) Compiled kernels vs references (fails are reported, the benchmark still runs).
timeout 110 python3 -m pytest -m gpu tests/test_kernels.py -q -rfEs --durations=10 \
  --junitxml="$OUT/junit_gpu.xml" 2>&1 | tee "$OUT/pytest_gpu.log"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT/pytest_gpu.log"

# 1b) The Mosaic GPU variants, new on the device: their own timeout (a barrier bug would
# hang, not fail); when it does not pass, the benchmark skips its rows.
timeout "${MOSAIC_TIMEOUT_S:-150}" python3 -m pytest -m gpu tests/test_kernels_mgpu.py -q -rfEs \
  --durations=5 2>&1 | tee "$OUT/pytest_mosaic.log"
mosaic_rc=${PIPESTATUS[0]}
echo "pytest mosaic exit: $mosaic_rc" | tee -a "$OUT/pytest_mosaic.log"
mosaic_flag=()
[ "$mosaic_rc" -eq 0 ] || mosaic_flag=(--config.mosaic=False)

# 2) Benchmark; results are rewritten after every shape, so a timeout keeps what was measured.
timeout "${BENCH_TIMEOUT_S:-120}" python3 -m experiments.kernel_bench \
  --config="${BENCH_CONFIG:-configs/kernel_bench.py:gpu}" \
  --config.time_budget_s="${BENCH_BUDGET_S:-90}" --workdir="$OUT/kernel_bench" \
  ${mosaic_flag[@]+"${mosaic_flag[@]}"} "$@" 2>&1 \
  | tee "$OUT/kernel_bench.log"
echo "kernel_bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/kernel_bench.log"
