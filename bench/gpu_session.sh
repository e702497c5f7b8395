#!/usr/bin/env bash
# The one command of a session lent a GPU machine, from the repository root (docs/gpu.md):
#
#   bash bench/gpu_session.sh          # give it a limit of BUDGET_S + 60 s (default: 480 s)
#
# It needs python3 with jax (CUDA), numpy and ml-dtypes, and torch + timm for the peer; no
# TensorFlow, no network. It runs the committed export bench/gpu_export/ (the job's graph,
# `bench/gpu_xla.py export`) with `bench/gpu_xla.py run`, then the timm peer, then prints both in
# one table. The most important configurations come first (bf16, float32, tf32 at batch 64, then
# the larger batches, then the smaller, then the peer) and everything ends within BUDGET_S.
# Environment (all optional):
#   OUT        where the files go (default bench/out/gpu): gpu.log (all output), env.txt,
#              gpu_xla.json (ours), timm.json (the peer), table.txt
#   BUDGET_S   seconds for the whole script (default 420); PEER_S of them are kept for the peer
#              (default 180)
#   EXPORT     the export to run (default bench/gpu_export)
#   PYTHON     (default python3)
#   ARGS       more arguments for both `run` and `peer` (e.g. "--seconds 2 --rounds 5")
#   PEER_ARGS  more arguments for `peer` (e.g. "--batch_sizes 64")
#   ALLOW_CPU=1  no GPU needed: a dry run of this script (numbers mean nothing), e.g. with a
#              small export: EXPORT=DIR PEER_ARGS="--small_models --image_size 64 --batch_sizes 4"
# Exit status: 0 when the export ran; 2 no GPU (or no jax); 3 or 124 when the budget stopped a
# step (its results so far are in the JSON).
set -uo pipefail
START=$SECONDS
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/bench/out/gpu}"
BUDGET_S="${BUDGET_S:-420}"
PEER_S="${PEER_S:-180}"
EXPORT="${EXPORT:-bench/gpu_export}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
export PYTHONUNBUFFERED=1
say() { echo "gpu_session: $*" | tee -a "$OUT/env.txt"; }
left() { echo $((BUDGET_S - (SECONDS - START))); }

# 1. The GPU as the driver and jax see it (read-only queries).
if [ "${ALLOW_CPU:-0}" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit \
    --format=csv | tee -a "$OUT/env.txt" || { say "ERROR: nvidia-smi failed: no GPU here"; exit 2; }
fi
CHECK='import jax, ml_dtypes, numpy, sys; d = jax.devices()[0]
print("python", sys.version.split()[0], "jax", jax.__version__, "numpy", numpy.__version__,
      "backend", d.platform, "device", d.device_kind)
sys.exit(0 if d.platform == "gpu" or sys.argv[1] == "1" else 2)'
if ! timeout 120 "$PY" -c "$CHECK" "${ALLOW_CPU:-0}" | tee -a "$OUT/env.txt"; then
  say "ERROR: $PY has no jax, or jax's default backend is not a GPU (ALLOW_CPU=1: run anyway)"
  exit 2
fi

# 2. Ours, with what is left less the peer's share; `timeout` only if its own watchdog fails.
budget=$(($(left) - PEER_S))
[ "$budget" -ge 30 ] || budget=30
say "bench/gpu_xla.py run $EXPORT --budget_s $budget"
# shellcheck disable=SC2086  # ARGS: words on purpose
timeout -k 10 $((budget + 30)) "$PY" bench/gpu_xla.py run "$EXPORT" --json "$OUT/gpu_xla.json" \
  --budget_s "$budget" ${ARGS:-}
status=$?

# 3. The peer, in its own process (the GPU memory jax held is free again), if torch is there.
if "$PY" -c "import timm, torch" 2>/dev/null; then
  budget=$(($(left) - 10))
  [ "$budget" -ge 30 ] || budget=30
  say "bench/gpu_xla.py peer --budget_s $budget"
  # shellcheck disable=SC2086
  timeout -k 10 $((budget + 20)) "$PY" bench/gpu_xla.py peer --json "$OUT/timm.json" \
    --budget_s "$budget" ${ARGS:-} ${PEER_ARGS:-}
else
  say "no torch + timm in $PY: no peer"
fi

# 4. Both in one table, and the clocks after the work.
files=("$OUT/gpu_xla.json")
[ -f "$OUT/timm.json" ] && files+=("$OUT/timm.json")
[ -f "$OUT/gpu_xla.json" ] && "$PY" bench/gpu_xla.py table "${files[@]}" | tee "$OUT/table.txt"
if [ "${ALLOW_CPU:-0}" != 1 ]; then
  nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv | tee -a "$OUT/env.txt"
fi
say "done in $((SECONDS - START)) s (run status $status); results in $OUT"
exit "$status"
