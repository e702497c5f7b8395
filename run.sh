#!/usr/bin/env bash
# One entry point for users and CI.
#   ./run.sh --input GLOB --output DIR [flags]   run the job locally (in-process runner, no network
#                                                 unless your inputs/models are on gs://)
#   ./run.sh test [pytest args]                  run the test suite
#   ./run.sh lint                                ruff check + ruff format --check + the import-linter
#                                                 layer contracts (all configured in pyproject.toml)
#   ./run.sh dataflow --project P --region R --bucket gs://B --input ... --output ...
#                                                 submit the job to Google Cloud Dataflow
#   ./run.sh fit_pca OUTPUT --dims N --to BASIS.npz [--max_samples M]
#                                                 fit a shared PCA basis on an output's embeddings
#   ./run.sh report OUTPUT                       (re)write OUTPUT/report.html from a finished run
#   ./run.sh docs [--check]                      regenerate docs/options.md from the flags' parsers
#   ./run.sh lock [--upgrade | --upgrade-package NAME]
#                                                 regenerate requirements.lock / requirements-dev.lock
#   ./run.sh index OUTPUT [--index_dir DIR]      index a run's results (appends to DIR)
#   ./run.sh search INDEX_OR_OUTPUT --image F | --key K | --tag T [--k 10] [--json]
#   ./run.sh serve INDEX_OR_OUTPUT [--host 127.0.0.1] [--port 8000]
#                                                 a search page + JSON API (docs/serve.md)
#   ./run.sh load OUTPUT --into postgresql://USER@HOST:PORT/DB [--table images]
#                                                 upsert a run's results into PostgreSQL + pgvector
# The first use creates .venv/ next to this script and installs the exact versions (with hashes) of
# requirements.lock (requirements-dev.lock for tests) into it; later uses reinstall only when a lock
# file or setup.py changed. requirements*.txt hold the human-edited ranges the locks come from.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CALLER="$PWD"  # the job runs here, so relative --input/--output mean what the user typed
cd "$HERE"
VENV="${BIT_TAGGER_VENV:-$HERE/.venv}"

pick_python() {
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then echo "$candidate"; return; fi
  done
  echo "run.sh: no python3 found (Python 3.11 is required)" >&2
  exit 1
}

UV_VERSION="0.13.9"  # the lock tool (https://docs.astral.sh/uv/), installed on demand by `lock`
LOCK_FLAGS=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes
            --index-url https://pypi.org/simple --quiet)

make_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "run.sh: creating $VENV (first run; installing TensorFlow and Beam takes a few minutes)" >&2
    "$(pick_python)" -m venv "$VENV"
  fi
}

stamp_of() {  # $1 = lock file -> the stamp that says the venv holds exactly it
  echo "$VENV/.installed-$(cat "$1" setup.py | sha256sum | cut -c1-16)"
}

ensure_venv() {  # $1 = lock file (exact versions with hashes)
  local lock="$1"
  local stamp
  stamp="$(stamp_of "$lock")"
  if [ -f "$stamp" ]; then return; fi
  # The test lock is constrained by the runtime lock: a venv installed from it runs the job too.
  if [ "$lock" = requirements.lock ] && [ -f "$(stamp_of requirements-dev.lock)" ]; then return; fi
  make_venv
  # Exact versions, every file checked against its hash; --no-deps: the lock lists every package.
  "$VENV/bin/python" -m pip install --quiet --require-hashes --no-deps -r "$lock" >&2
  "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e . >&2
  # The fused CPU GroupNorm kernel (~20 s to compile; without a C++ compiler the job uses TF ops).
  "$VENV/bin/python" -m model.kernels >&2 || true
  rm -f "$VENV"/.installed-*
  touch "$stamp"
}

lock() {  # regenerate both locks for Linux x86_64, Python 3.11 (what CI and Dataflow run)
  make_venv
  "$VENV/bin/python" -m pip install --quiet "uv==$UV_VERSION" >&2
  "$VENV/bin/python" -m uv pip compile requirements.txt "${LOCK_FLAGS[@]}" "$@" \
    -o requirements.lock
  # The test lock is constrained by the runtime lock, so both install the same runtime versions.
  "$VENV/bin/python" -m uv pip compile requirements-dev.txt -c requirements.lock \
    "${LOCK_FLAGS[@]}" "$@" -o requirements-dev.lock
  echo "run.sh: wrote requirements.lock and requirements-dev.lock" >&2
}

# Offline-safe defaults: no metadata-server probe, no gcsfs gRPC bucket-type call.
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="${GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT:-false}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

case "${1:-}" in
  test)
    shift
    ensure_venv requirements-dev.lock
    export NO_GCE_CHECK=true
    set +e
    # `./run.sh test tests/test_x.py -x` runs just those tests; with no path, the whole suite.
    targets=(tests)
    for arg in "$@"; do case "$arg" in tests/*|tests) targets=(); break ;; esac; done
    "$VENV/bin/python" -m pytest "${targets[@]}" -q -p no:cacheprovider "$@"
    rc=$?
    set -e
    [ "$rc" -eq 5 ] && { echo "run.sh: no tests were collected" >&2; exit 1; }
    exit "$rc"
    ;;
  lint)
    shift
    ensure_venv requirements-dev.lock
    "$VENV/bin/python" -m ruff check . "$@"
    "$VENV/bin/python" -m ruff format --check .
    # The layer contracts of ARCHITECTURE.md ([tool.importlinter] in pyproject.toml).
    exec "$VENV/bin/lint-imports" --no-cache --no-logo
    ;;
  dataflow)
    shift
    ensure_venv requirements.lock
    cd "$CALLER"
    exec "$VENV/bin/python" -m pipeline.dataflow "$@"
    ;;
  fit_pca)
    shift
    ensure_venv requirements.lock
    cd "$CALLER"
    exec "$VENV/bin/python" -m pipeline.fit_pca "$@"
    ;;
  report)
    shift
    ensure_venv requirements.lock
    cd "$CALLER"
    exec "$VENV/bin/python" -m pipeline.report "$@"
    ;;
  lock)
    shift
    lock "$@"
    ;;
  docs)
    shift
    ensure_venv requirements.lock
    exec "$VENV/bin/python" -m tools.gen_options "$@"
    ;;
  index|search|serve)
    ensure_venv requirements.lock
    cd "$CALLER"
    exec "$VENV/bin/python" -m search "$@"
    ;;
  load)
    ensure_venv requirements.lock
    cd "$CALLER"
    exec "$VENV/bin/python" -m search.pgvector "$@"
    ;;
  *)
    ensure_venv requirements.lock
    cd "$CALLER"
    exec "$VENV/bin/python" -m pipeline "$@"
    ;;
esac
