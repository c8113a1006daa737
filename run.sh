#!/usr/bin/env bash
# The one entry point. See README.md or `./run.sh --help`.
#   ./run.sh                 set up .venv, build the demo data, run every stage on each demo config
#   ./run.sh test            set up .venv with the test tools, lint, run the test suite
#   ./run.sh docs            regenerate docs/configuration.md and serve the documentation (MkDocs)
#   ./run.sh STAGE -c CFG    run one stage (folds|train|embed|ensemble|retrieve|submit|all), --force redoes it
#   ./run.sh data | score SUB SOL | bench ...
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
UV_VERSION=0.9.7
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

ensure_env() {
  # $@: requirement files. Reinstalls only when their content (or this script's pins) changed.
  local stamp="$VENV/.requirements.sha256"
  local want
  want=$(cat "$@" pyproject.toml | sha256sum | cut -d' ' -f1)
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return 0; fi
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[setup] creating $VENV with $PY"
    "$PY" -m venv "$VENV"
  fi
  if [[ ! -x "$VENV/bin/uv" ]]; then
    echo "[setup] installing uv $UV_VERSION"
    "$VENV/bin/python" -m pip install -q "uv==$UV_VERSION"
  fi
  # uv does not read pip's configuration, so the machine-local CPU-only torch build that pip
  # prefers is never picked: torchvision's PyPI wheels need PyPI's torch.
  local reqs=()
  for f in "$@"; do reqs+=(-r "$f"); done
  echo "[setup] installing pinned requirements: $*"
  "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" "${reqs[@]}"
  "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --no-deps -e .
  "$VENV/bin/python" -c "import torch, torchvision, timm, faiss, albumentations, cv2, onnx, onnxruntime" \
    || { echo "[setup] the environment does not import; see README 'Installation'" >&2; exit 1; }
  echo "$want" >"$stamp"
}

case "${1:-}" in
  docs)
    shift
    ensure_env requirements.txt requirements-test.txt
    "$VENV/bin/python" -m dmlkit.config.reference docs/configuration.md
    exec "$VENV/bin/mkdocs" serve "$@"
    ;;
  test)
    shift
    ensure_env requirements.txt requirements-test.txt
    "$VENV/bin/ruff" check src tests benchmarks
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    if [[ -f "$VENV/.requirements.sha256" ]] && [[ -f requirements-test.txt ]] \
       && [[ "$(cat "$VENV/.requirements.sha256")" == "$(cat requirements.txt requirements-test.txt pyproject.toml | sha256sum | cut -d' ' -f1)" ]]; then
      :  # a test environment is a superset of the runtime one: keep it
    else
      ensure_env requirements.txt
    fi
    if [[ $# -eq 0 ]]; then
      exec "$VENV/bin/python" -m dmlkit demo
    fi
    if [[ "$1" == "bench" ]]; then
      shift
      exec "$VENV/bin/python" benchmarks/run.py "$@"
    fi
    exec "$VENV/bin/python" -m dmlkit "$@"
    ;;
esac
