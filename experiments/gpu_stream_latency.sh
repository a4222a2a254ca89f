#!/usr/bin/env bash
# The GPU run of the main job, with the HF transformers peer in the same call (ratios between
# the two hold only within one run). Expects: the peer script copied to .peer/hf_peer.py and
# wheels of packages the GPU image lacks in .whl/ (see docs/gpu.md). Writes under $OUT.
set -euo pipefail
OUT=${OUT:-/tmp/statejax_gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# `kernels/` installs as `statejax.kernels`; without an install, link it for this run (needed
# only with --config.impl=pallas).
if ! python3 -c "import statejax.kernels" 2>/dev/null && [ ! -e statejax/kernels ]; then
  ln -s ../kernels statejax/kernels
  trap 'rm -f statejax/kernels' EXIT
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; } | tee "$OUT/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
PEER_FLAG=()
if [ "${SKIP_PEER:-0}" != 1 ]; then
  # Writes $OUT/hf_peer.json; the study reads it (kept-cache column and the >= 8x target).
  OUT="$OUT" python3 .peer/hf_peer.py 2>&1 | tail -8
  PEER_FLAG=(--config.roofline.peer_json="$OUT/hf_peer.json")
fi
python3 -m experiments.stream_latency --config="${STUDY_CONFIG:-configs/stream_latency.py:gpu}" \
  --workdir="$OUT/stream_latency" "${PEER_FLAG[@]}" "$@" 2>&1 | tee "$OUT/stream_latency.log"
# Where the step's time goes outside attention (weight groups vs their read floor).
timeout "${PROFILE_TIMEOUT_S:-180}" python3 -m experiments.step_profile \
  --config=configs/step_profile.py:${PROFILE_VARIANT:-gpu} --workdir="$OUT/step_profile" 2>&1 \
  | tee "$OUT/step_profile.log" || echo "step_profile failed or timed out"
# Optional A/B of XLA flags on the same profile (e.g. what CUDA graphs save per launch:
# PROFILE_XLA_FLAGS="--xla_gpu_enable_command_buffer=").
if [ -n "${PROFILE_XLA_FLAGS:-}" ]; then
  XLA_FLAGS="${XLA_FLAGS:-} $PROFILE_XLA_FLAGS" timeout "${PROFILE_TIMEOUT_S:-180}" \
    python3 -m experiments.step_profile --config=configs/step_profile.py:${PROFILE_VARIANT:-gpu} \
    --workdir="$OUT/step_profile_xla_flags" 2>&1 | tee "$OUT/step_profile_xla_flags.log" \
    || echo "step_profile (PROFILE_XLA_FLAGS) failed or timed out"
fi
