#!/usr/bin/env bash
# bench/gpu.py as ONE prepared command for a session lent a GPU machine (the `run` tool), from the
# repository root there:
#
#   run(command="bash bench/gpu_session.sh", timeout_s=540)             # BUDGET_S=450 (default)
#   run(command="BUDGET_S=240 bash bench/gpu_session.sh --precisions bfloat16", timeout_s=300)
#
# BUDGET_S is this whole script's wall time (the checks, TensorFlow's import, writing the random
# checkpoints, the measurements); give the command a timeout_s of at least BUDGET_S + 60. With the
# default 450 s and a machine start of 1-2 minutes, a first call spends about 9 minutes of the
# 15-minute device time, which leaves a warm rerun of ~240 s (the checkpoints are kept in
# bench/out/gpu-ckpts, an ignored folder that stays on a warm machine between calls). Arguments
# go to bench/gpu.py (e.g. --batch_sizes 32,64 --model_copies 1,2,3 --seconds 5).
# Writes to $OUT (the run tool's folder that comes back; ./bench/out/gpu elsewhere):
#   gpu.log (all output), gpu.json (bench/gpu.py --json), env.txt (GPU, driver, Python, TF).
# Exit status: bench/gpu.py's (0; 3 when its watchdog stopped it at the budget with partial
# results; 124 when `timeout` had to stop it), 2 no GPU visible to TensorFlow, 4 no usable Python.
#
# What the device machine must have (nothing can be installed there: no network).
# bench/gpu.py imports numpy, TensorFlow and this repo's model/ and tests/bit_checkpoints.py (no
# Beam, no pyarrow). TensorFlow must be 2.21 (requirements.txt / requirements.lock pin
# tensorflow==2.21.0) and must SEE THE GPU, which needs CUDA 12 + cuDNN 9 libraries: the
# tensorflow wheel is a CUDA build (CUDA 12.5.1, cuDNN 9; SASS up to sm_89, PTX for compute_90, so
# an H100/H200 JIT-compiles its kernels on first use), but the CUDA libraries come only with the
# `and-cuda` extra (nvidia-*-cu12 wheels). requirements.lock does NOT contain them: the .venv that
# run.sh makes from the lock runs TensorFlow on the CPU only (on a GPU machine too); the Dockerfile
# is the one place that installs `tensorflow[and-cuda]==2.21.0`.
# The python found first of: $BIT_TAGGER_PYTHON, .venv/bin/python (if it runs there), python3;
# with a .whl/ folder in the repo (carried: carry=[".whl"]), its wheels are installed first with
# `pip install --no-index --no-deps --target /tmp/site` and put on PYTHONPATH (the device README's
# recipe): tensorflow 2.21.0 and the nvidia-*-cu12 wheels of its and-cuda extra for the device's
# Python (3.12 in this workplace's image, 2026-11), plus TensorFlow's pure-Python dependencies
# that the image lacks (keras, gast, astunparse, google-pasta, termcolor, libclang, ...).
# LIMITS (this workplace, 2026-11): the image there has no TensorFlow and only CUDA 13 libraries
# (for PyTorch/JAX; TensorFlow 2.21 cannot load them), and a call carries at most 64 MiB
# (working tree + carried paths), while the tensorflow wheel alone is hundreds of MB (1.9 GB
# installed) and the CUDA 12 wheels more than 1 GB. A carried .venv cannot work either: its
# python is a symlink to the interpreter of the machine that made it (Python 3.11 there, 3.12 on
# the device), it lacks the CUDA 12 libraries, and it is about 3.4 GB. So this script measures
# only where a TensorFlow with CUDA 12 is there (an image that has one, or a carry limit that fits
# the wheels); elsewhere it stops within seconds, with exit status 2 or 4, and says why.
#
# ALLOW_CPU=1 runs it without a GPU (no nvidia-smi needed; bench/gpu.py --allow_cpu): only to
# check this script, e.g. ALLOW_CPU=1 BUDGET_S=200 bash bench/gpu_session.sh --small_models
# --image_size 32 --batch_sizes 2,4 --seconds 0.2 --rounds 1
set -euo pipefail
START=$SECONDS
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/bench/out/gpu}"
BUDGET_S="${BUDGET_S:-450}"
CKPT_DIR="${CKPT_DIR:-$PWD/bench/out/gpu-ckpts}"
mkdir -p "$OUT" "$CKPT_DIR"
ENV_TXT="$OUT/env.txt"
: >"$ENV_TXT"

say() { echo "gpu_session: $*" | tee -a "$ENV_TXT" >&2; }
fail() {
  local status="$1"
  shift
  say "ERROR: $*"
  exit "$status"
}

# 1. The GPU, as the driver sees it (read-only queries; nothing about the card is changed).
if [ "${ALLOW_CPU:-0}" = 1 ]; then
  say "ALLOW_CPU=1: no GPU check, bench/gpu.py runs with --allow_cpu (numbers mean nothing)"
elif ! command -v nvidia-smi >/dev/null 2>&1; then
  fail 2 "nvidia-smi not found: this is not a GPU machine (or its driver is not mounted)"
else
  query=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu
  nvidia-smi --query-gpu="$query,utilization.gpu" --format=csv 2>&1 | tee -a "$ENV_TXT" >&2 \
    || fail 2 "nvidia-smi failed"
  if command -v ptxas >/dev/null 2>&1; then
    say "ptxas for XLA: $(command -v ptxas) ($(ptxas --version 2>&1 | tail -n 1))"
  else
    say "no ptxas on PATH (XLA then uses the one of nvidia-cuda-nvcc-cu12 or the driver's JIT)"
  fi
fi

# 2. A Python with TensorFlow (carried wheels first).
if compgen -G ".whl/*.whl" >/dev/null; then
  say "installing the carried wheels of .whl/ into /tmp/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || fail 4 "pip could not install the wheels of .whl/"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
PY=""
HAS_TF='import importlib.util, sys; sys.exit(importlib.util.find_spec("tensorflow") is None)'
for candidate in "${BIT_TAGGER_PYTHON:-}" .venv/bin/python python3; do
  [ -n "$candidate" ] || continue
  if ! command -v "$candidate" >/dev/null 2>&1; then
    say "no $candidate here (or it does not run here)"
    continue
  fi
  if "$candidate" -c "$HAS_TF" >/dev/null 2>&1; then
    PY="$candidate"
    break
  fi
  say "no TensorFlow in $candidate ($("$candidate" -V 2>&1 | head -n 1))"
done
[ -n "$PY" ] || fail 4 "no Python here has TensorFlow (see the header of bench/gpu_session.sh: \
TensorFlow 2.21 with CUDA 12 + cuDNN 9 must be on the machine or carried as wheels in .whl/)"

export PYTHONUNBUFFERED=1 TF_FORCE_GPU_ALLOW_GROWTH=true
# Keep the JIT-compiled kernels of TF's compute_90 PTX (H100/H200) for the rest of the run and
# for a rerun on the warm machine (the default 256 MiB cache can evict them).
export CUDA_CACHE_MAXSIZE="${CUDA_CACHE_MAXSIZE:-4294967296}"

# 3. TensorFlow sees the GPU? (warnings on: a missing CUDA library is named by TF's dlopen lines)
CHECK='
import sys
import tensorflow as tf
info = tf.sysconfig.get_build_info()
gpus = tf.config.list_physical_devices("GPU")
print("python", sys.version.split()[0], "| tensorflow", tf.__version__, "| built for CUDA",
      info.get("cuda_version"), "cuDNN", info.get("cudnn_version"), "| GPUs:", gpus)
sys.exit(0 if gpus else 2)
'
set +e
TF_CPP_MIN_LOG_LEVEL=1 timeout 240 "$PY" -c "$CHECK" >"$OUT/tf_check.txt" 2>&1
status=$?
set -e
grep -v "^$" "$OUT/tf_check.txt" | tail -n 25 | tee -a "$ENV_TXT" >&2 || true
if [ "$status" -ne 0 ] && [ "${ALLOW_CPU:-0}" != 1 ]; then
  [ "$status" = 124 ] && fail 2 "TensorFlow's import and GPU start took over 240 s"
  fail 2 "TensorFlow ($PY) sees no GPU (status $status): its CUDA 12 / cuDNN 9 libraries are \
missing or do not load (look for 'Cannot dlopen' above); install tensorflow[and-cuda]==2.21.0"
fi

# 4. The benchmark, inside what is left of the budget: 30 s are kept for its watchdog's grace
# (max(10 s, 5%): it then prints what it has and exits 3) and the end; `timeout` stops it (SIGTERM:
# it prints what it has) only if even that fails.
left=$((BUDGET_S - (SECONDS - START) - 30))
[ "$left" -ge 60 ] || fail 4 "only ${left} s of BUDGET_S=${BUDGET_S} left for the benchmark"
grace=$((left / 20 > 10 ? left / 20 : 10))
extra=()
if [ "${ALLOW_CPU:-0}" = 1 ]; then extra+=(--allow_cpu); fi
say "bench/gpu.py with --budget_s $left (python: $PY)"
set +e
TF_CPP_MIN_LOG_LEVEL=2 timeout --signal=TERM --kill-after=10 $((left + grace + 10)) \
  "$PY" bench/gpu.py --budget_s "$left" --json "$OUT/gpu.json" --checkpoint_dir "$CKPT_DIR" \
  "${extra[@]}" "$@" 2>&1 | tee "$OUT/gpu.log"
status=${PIPESTATUS[0]}
set -e
if [ "${ALLOW_CPU:-0}" != 1 ]; then
  nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv \
    2>&1 | tee -a "$ENV_TXT" >&2 || true
fi
say "done in $((SECONDS - START)) s, bench/gpu.py status $status; results in $OUT"
exit "$status"
