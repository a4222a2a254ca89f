#!/usr/bin/env bash
# The device checks in one call: the parts named in PARTS, in that order, each under its
# own timeout so a hang or a slow part costs only its slot (a session has 15 minutes of device
# time in all, machine start included). Parts and their caps (seconds, env overrides):
#   stream   the HF peer (at most PEER_S=90 of the cap), then the stateful query with
#            Pallas kernels vs its floor (configs/stream_latency.py:gpu-floor; STREAM_FLAGS
#            adds flags)                                                         STREAM_S=330
#   tests    compiled-GPU tests: kernels (Triton), the model on the kernels      TESTS_S=150
#   fused    compiled-GPU tests of the fused linear kernels alone                 FUSED_S=90
#   tune     kernel bench: target shapes + the Triton block-size grids (:gpu-tune) TUNE_S=180
#   bench    kernel bench: every shape of :gpu with baselines (cascade included) BENCH_S=150
#   query    kernel bench :gpu-query: the end-to-end query's attention, its tiles  QUERY_S=150
#            grid; records the fastest tiles in kernels/tuned/ for the parts after it;
#            then its Mosaic GPU shared part in a process of its own    QUERY_MOSAIC_S=60
#   profile  step profile: the query step (and its kernels, profiler trace),    PROFILE_S=200
#            its latency, host transfers and Session.query, a decode token, projections /
#            MLP / logits vs their floor, then the query rows at 32k; rows written as they
#            come: a slot cut short keeps those it reached
#            (again with PROFILE_XLA_FLAGS added to XLA_FLAGS, when set: an A/B in one call);
#            PROFILE_VLOG=1 (default): XLA's CUDA-graph replays / updates per row
#   linear   the fused linear calls of a 1B block over a grid of tiles (warps, stages, K
#            steps, strip widths), each call once per layer's weights, their kernels'
#            device time from a profiler trace (configs/step_profile.py:gpu-linear) LINEAR_S=150
#   mosaic   Mosaic GPU tests, then (if they pass) the Mosaic rows of :gpu-tune   MOSAIC_S=60 x 2
# What each part took on a device: docs/studies.md.
# Everything is written under a work folder (emptied first: a second call on a warm machine
# must not report the first's results) and packed into $OUT/session.tgz after each part and
# every PACK_EVERY=10 s while one runs (a device call returns at most 8 files; a call killed
# at its limit returns the last pack); the short tables are printed last. A cap of 0 skips
# its part.
# Run from the repo root with carry [".whl", ".peer"] (docs/gpu.md); CPU dry run: docs/gpu.md.
set -uo pipefail
OUT=${OUT:-/tmp/statejax_gpu_session}
WORK=${WORK:-/tmp/statejax_gpu_session_work}
# The first call of the plan in docs/gpu.md (caps 200 + 330 s).
PARTS=${PARTS:-profile stream}
for part in $PARTS; do  # refused before any setup: the reply's tail might not show it later
  case "$part" in
    stream|tests|fused|tune|bench|query|profile|linear|mosaic) ;;
    *) echo "unknown part $part; allowed: stream tests fused tune bench query profile linear" \
         "mosaic"
       exit 2 ;;
  esac
done
# WORK is emptied: refused if it is /, $HOME, or holds the checkout (compared resolved).
work_real=$(realpath -m "$WORK")
case "$(realpath -m "$PWD")/" in
  "$work_real"/*|/) echo "WORK=$WORK holds the checkout; set a scratch folder"; exit 2 ;;
esac
if [ "$work_real" = / ] || [ "$work_real" = "$(realpath -m "$HOME")" ]; then
  echo "WORK=$WORK would be emptied; set a scratch folder"; exit 2
fi
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
# XLA's GEMM autotuning results shared between the parts' processes: the profile and the
# stream study compile the same projections (outside $WORK: not packed). Only the chosen
# configs are cached, not kernels (an on-disk kernel cache is reported to drop Hopper TMA
# metadata: openxla/xla#35951): a hit picks a tiling, as a fresh autotuning would.
AUTOTUNE_DIR=${AUTOTUNE_DIR:-/tmp/statejax_autotune}
mkdir -p "$AUTOTUNE_DIR"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_per_fusion_autotune_cache_dir=$AUTOTUNE_DIR"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
# `kernels/` installs as `statejax.kernels`; offline, link it into the package for this run.
linked=""
if ! python3 -c "import statejax.kernels" 2>/dev/null \
    && [ ! -e statejax/kernels ]; then
  ln -s ../kernels statejax/kernels
  linked=1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv || echo "no nvidia-smi"; } | tee "$WORK/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, \
jax.devices())" | tee "$WORK/env.txt"
t0=$SECONDS
# The archive is written aside and renamed into place, so a call cut off mid-write still
# returns the previous one; a background packer refreshes it every PACK_EVERY s, so what a
# part writes as it goes (the stream study's contexts, the profile's rows) comes back even if
# the device call's own limit ends the script inside a part.
# (tar exits 1 when a file changed while it read it: the archive is still whole.)
archive() { local tmp="$OUT/.session.$BASHPID.tgz"
            tar -czf "$tmp" -C "$WORK" . 2>/dev/null
            if [ $? -le 1 ]; then mv -f "$tmp" "$OUT/session.tgz"; else rm -f "$tmp"; fi; }
pack() { echo "== $1: $((SECONDS - t0)) s" | tee -a "$WORK/parts.txt"; archive; }
# Sleeps in the background so that a TERM ends the packer at once (waiting, not archiving).
( trap 'kill $! 2>/dev/null; exit 0' TERM
  while :; do sleep "${PACK_EVERY:-10}" & wait $!; archive; done ) > /dev/null 2>&1 &
packer=$!
trap 'kill "$packer" 2>/dev/null; [ -n "$linked" ] && rm -f statejax/kernels' EXIT

# capped NAME CAP: false (and says so) when CAP <= 0, which skips the part (`timeout 0` would
# run it without a limit).
capped() { [ "$2" -gt 0 ] || { echo "$1: cap $2, skipped"; return 1; }; }

# stream_study CAP: the stateful study (with the peer's JSON if the peer wrote one), at most
# CAP s.
stream_study() {
  [ "$1" -gt 0 ] || { echo "stream: no time left for the study"; return 124; }
  local peer=()
  [ -s "$WORK/hf_peer.json" ] && peer=(--config.roofline.peer_json="$WORK/hf_peer.json")
  timeout "$1" python3 -m experiments.stream_latency \
    --config="${STREAM_CONFIG:-configs/stream_latency.py:gpu-floor}" \
    --workdir="$WORK/stream_latency" "${peer[@]}" ${STREAM_FLAGS:-} \
    >> "$WORK/stream_latency.log" 2>&1
}

# The peer, then the study. If the study fails (not a timeout) while the table holds Mosaic GPU
# cascade entries, which the model's queries then run at windows the benchmark did not check,
# those entries are dropped (the pack keeps the full table from part query) and the study runs
# again on Triton in the cap's remaining time.
run_stream() {
  local cap=${STREAM_S:-330} start=$SECONDS tuned=${TUNED_DIR:-kernels/tuned}
  capped stream "$cap" || return 0
  local peer_cap=$(( ${PEER_S:-90} < cap ? ${PEER_S:-90} : cap ))
  if capped peer "$peer_cap"; then
    OUT="$WORK" timeout "$peer_cap" python3 .peer/hf_peer.py > "$WORK/hf_peer.log" 2>&1
    echo "peer exit: $? (hf_peer.json $([ -s "$WORK/hf_peer.json" ] && echo written \
      || echo missing: no peer columns))" | tee "$WORK/stream_latency.log"
  fi
  stream_study $(( cap - (SECONDS - start) ))
  local rc=$?
  echo "stream exit: $rc" | tee -a "$WORK/stream_latency.log"
  local left=$(( cap - (SECONDS - start) ))
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] && [ "$left" -gt 60 ] \
      && grep -qs '"mosaic_gpu"' "$tuned"/*.json; then
    echo "stream: dropping the Mosaic GPU entries of $tuned and running again ($left s)" \
      | tee -a "$WORK/stream_latency.log"
    python3 - "$tuned" <<'PY'
import glob, json, sys
for path in glob.glob(f"{sys.argv[1]}/*.json"):
    table = json.load(open(path))
    table["entries"] = [e for e in table["entries"] if e.get("backend") != "mosaic_gpu"]
    json.dump(table, open(path, "w"), indent=1)
PY
    stream_study "$left"
    echo "stream exit (Triton only): $?" | tee -a "$WORK/stream_latency.log"
  fi
}

run_tests() {
  capped tests "${TESTS_S:-150}" || return 0
  timeout "${TESTS_S:-150}" python3 -m pytest -p no:cacheprovider -m gpu -q -rfEs \
    --durations=5 tests/kernels/test_kernels.py tests/kernels/test_kernels_model.py \
    tests/kernels/test_fused_linear.py \
    > "$WORK/pytest_gpu.log" 2>&1
  echo "pytest exit: $?" | tee -a "$WORK/pytest_gpu.log"
}

run_fused() {
  capped fused "${FUSED_S:-90}" || return 0
  timeout "${FUSED_S:-90}" python3 -m pytest -p no:cacheprovider -m gpu -q -rfEs \
    --durations=5 tests/kernels/test_fused_linear.py > "$WORK/pytest_fused.log" 2>&1
  echo "pytest fused exit: $?" | tee -a "$WORK/pytest_fused.log"
}

# kernel_bench NAME CAP CONFIG [FLAGS...]: one benchmark run into $WORK/NAME, under CAP seconds
# (its own time budget MARGIN s less, default 20, so it writes its results before the timeout).
kernel_bench() {
  local name=$1 cap=$2 config=$3
  shift 3
  capped "$name" "$cap" || return 0
  timeout "$cap" python3 -m experiments.kernel_bench --config="$config" \
    --config.time_budget_s="$(( cap - ${MARGIN:-20} ))" --workdir="$WORK/$name" "$@" \
    > "$WORK/$name.log" 2>&1
  echo "$name exit: $?" | tee -a "$WORK/$name.log"
}

run_tune() {
  kernel_bench bench_triton "${TUNE_S:-180}" "${TUNE_CONFIG:-configs/kernel_bench.py:gpu-tune}" \
    --config.mosaic=False
}

run_bench() {
  kernel_bench bench "${BENCH_S:-150}" "${BENCH_CONFIG:-configs/kernel_bench.py:gpu}"
}

# The query's tiles: the fastest of each grid shape and backend (matching the reference, also
# in the model's cells form) are recorded in kernels/tuned/ (this GPU model's table), which
# the kernels' defaults read: parts after this one (stream, profile) run them. Two processes:
# the Triton grid first, then the Mosaic GPU shared part, which has never run compiled in this
# form (a CUDA fault poisons its process: it then costs only its own rows, and what the Triton
# process recorded stays; the second records only its backend, so its Triton default row does
# not replace the grid winner). 45 / 30 s of the caps are left for the cells-form checks and
# writing. The table travels back in the pack.
run_query() {
  local tuned=${TUNED_DIR:-kernels/tuned}
  local config=${QUERY_CONFIG:-configs/kernel_bench.py:gpu-query}
  MARGIN=45 kernel_bench bench_query "${QUERY_S:-150}" "$config" --config.mosaic=False \
    --config.tuned_dir="$tuned"
  if [ "${QUERY_MOSAIC_S:-60}" -gt 0 ]; then
    MARGIN=30 kernel_bench bench_query_mosaic "${QUERY_MOSAIC_S:-60}" "$config" \
      --config.tune_cascade='()' --config.tune_cascade_second='()' --config.tune_decode='()' \
      --config.tune_append='()' --config.decode='()' --config.cascade_targets='()' \
      --config.tuned_dir="$tuned" --config.record_backends='("mosaic_gpu",)'
  fi
  [ -d "$tuned" ] && rm -rf "$WORK/tuned" && cp -r "$tuned" "$WORK/tuned"
}

# step_profile NAME [CAP CONFIG [FLAGS...]]: the profile into $WORK/NAME (XLA_FLAGS as the
# caller sets them; CAP and CONFIG default to PROFILE_S and PROFILE_CONFIG; FLAGS are the
# launcher's). With PROFILE_VLOG=1 (default)
# XLA logs its CUDA-graph replays and updates into the profile's log, split by row into
# NAME/command_buffers.md (statejax/perf/command_buffer_log.py).
step_profile() {
  local name=$1 cap=${2:-${PROFILE_S:-200}}
  local config=${3:-${PROFILE_CONFIG:-configs/step_profile.py:gpu}}
  shift $(( $# < 3 ? $# : 3 ))
  capped "$name" "$cap" || return 0
  local vlog=()
  [ "${PROFILE_VLOG:-1}" = 1 ] && vlog=(TF_CPP_VMODULE=command_buffer_thunk=3
                                        TF_CPP_MIN_LOG_LEVEL=0)
  env "${vlog[@]}" timeout "$cap" python3 -m experiments.step_profile \
    --config="$config" --workdir="$WORK/$name" "$@" > "$WORK/$name.log" 2>&1
  echo "$name exit: $?" | tee -a "$WORK/$name.log"
  [ "${PROFILE_VLOG:-1}" = 1 ] && python3 -m experiments.command_buffer_log \
    --log="$WORK/$name.log" --workdir="$WORK/$name" > /dev/null 2>> "$WORK/$name.log"
  return 0
}

run_profile() {
  step_profile step_profile
  # Optional A/B of XLA flags on the same profile, e.g. what CUDA graphs save per launch:
  # PROFILE_XLA_FLAGS="--xla_gpu_enable_command_buffer=".
  [ -n "${PROFILE_XLA_FLAGS:-}" ] || return 0
  XLA_FLAGS="${XLA_FLAGS:-} $PROFILE_XLA_FLAGS" step_profile step_profile_xla_flags
}

# The fused linear calls' tiles grid alone (no query rows): which tiles stream the weights
# fastest, by their kernels' device time (a profiler trace per row).
run_linear() {
  local tuned=${TUNED_DIR:-kernels/tuned}
  PROFILE_VLOG=0 step_profile linear_tiles "${LINEAR_S:-150}" \
    "${LINEAR_CONFIG:-configs/step_profile.py:gpu-linear}" --config.tuned_dir="$tuned"
  [ -d "$tuned" ] && rm -rf "$WORK/tuned" && cp -r "$tuned" "$WORK/tuned"
}

run_mosaic() {
  capped mosaic "${MOSAIC_S:-60}" || return 0
  timeout "${MOSAIC_S:-60}" python3 -m pytest -p no:cacheprovider -m gpu \
    tests/kernels/test_kernels_mgpu.py -q -rfEs -x > "$WORK/pytest_mosaic.log" 2>&1
  local rc=$?
  echo "pytest mosaic exit: $rc" | tee -a "$WORK/pytest_mosaic.log"
  [ "$rc" -eq 0 ] || return 0
  kernel_bench bench_mosaic "${MOSAIC_S:-60}" configs/kernel_bench.py:gpu-tune \
    --config.tune_decode='()' --config.tune_append='()'
}

for part in $PARTS; do
  pack "start $part"
  "run_$part"
done
kill "$packer" 2>/dev/null; wait "$packer" 2>/dev/null
rm -f "$OUT"/.session.*.tgz  # a refresh the packer's end cut short
pack "done"

# The reply carries the tail of stdout: the short results last.
for f in stream_latency/results.md bench/results.md bench_triton/results.md \
    bench_query/results.md bench_query_mosaic/results.md bench_mosaic/results.md \
    step_profile/results.md step_profile/command_buffers.md linear_tiles/results.md \
    step_profile_xla_flags/command_buffers.md; do
  [ -f "$WORK/$f" ] && { echo "### $f"; grep -v '^$' "$WORK/$f" | tail -25; }
done
tail -n 3 "$WORK/pytest_gpu.log" "$WORK/pytest_fused.log" "$WORK/pytest_mosaic.log" 2>/dev/null
exit 0
