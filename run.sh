#!/usr/bin/env bash
# One entry point for users and CI.
#   ./run.sh --input GLOB --output DIR [flags]   run the job locally (in-process runner, no network
#                                                 unless your inputs/models are on gs://)
#   ./run.sh test [pytest args]                  run the test suite
#   ./run.sh dataflow --project P --region R --bucket gs://B --input ... --output ...
#                                                 submit the job to Google Cloud Dataflow
#   ./run.sh index OUTPUT [--index_dir DIR]      index a run's results (appends to DIR)
#   ./run.sh search INDEX_OR_OUTPUT --image F | --key K | --tag T [--k 10] [--json]
# The first use creates .venv/ next to this script and installs the project into it; later uses
# reinstall only when requirements*.txt or setup.py changed.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"
VENV="${BIT_TAGGER_VENV:-$HERE/.venv}"

pick_python() {
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then echo "$candidate"; return; fi
  done
  echo "run.sh: no python3 found (Python 3.11 is required)" >&2
  exit 1
}

ensure_venv() {  # $1 = requirements file
  local requirements="$1"
  local stamp="$VENV/.installed-$(cat "$requirements" requirements.txt setup.py | sha256sum | cut -c1-16)"
  if [ -f "$stamp" ]; then return; fi
  if [ ! -x "$VENV/bin/python" ]; then
    echo "run.sh: creating $VENV (first run; installing TensorFlow and Beam takes a few minutes)" >&2
    "$(pick_python)" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -r "$requirements" >&2
  "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e . >&2
  # The fused CPU GroupNorm kernel (~20 s to compile; without a C++ compiler the job uses TF ops).
  "$VENV/bin/python" -m model.kernels >&2 || true
  rm -f "$VENV"/.installed-*
  touch "$stamp"
}

# Offline-safe defaults: no metadata-server probe, no gcsfs gRPC bucket-type call.
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="${GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT:-false}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

case "${1:-}" in
  test)
    shift
    ensure_venv requirements-dev.txt
    export NO_GCE_CHECK=true
    set +e
    "$VENV/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
    rc=$?
    set -e
    [ "$rc" -eq 5 ] && { echo "run.sh: no tests were collected" >&2; exit 1; }
    exit "$rc"
    ;;
  dataflow)
    shift
    ensure_venv requirements.txt
    exec "$VENV/bin/python" -m pipeline.dataflow "$@"
    ;;
  index|search)
    ensure_venv requirements.txt
    exec "$VENV/bin/python" -m search "$@"
    ;;
  *)
    ensure_venv requirements.txt
    exec "$VENV/bin/python" -m pipeline "$@"
    ;;
esac
