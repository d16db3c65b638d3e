#!/usr/bin/env bash
# Set up erpo-mega from nothing (Python 3.11 + pip): a venv in .venv with the local CPU torch wheel.
#   bash tools/setup.sh          # runtime
#   bash tools/setup.sh --dev    # + test tools, and a local Slurm (apt, root only) for the launch tests
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    *) echo "setup.sh: unknown argument '$arg' (use --dev)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: pip takes the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
if [ "$DEV" = 1 ]; then
  pip install -q -e ".[dev]"
  # SGLang's own code as a test referee (tests/sglang_referee.py): the wheel without its GPU
  # dependencies (they would replace the CPU torch), plus the small pure-Python packages its
  # server_args / utils / weight_sync modules import.
  python -c "import importlib.metadata as m; assert m.version('sglang') == '0.5.23'" 2>/dev/null || \
    pip install -q --no-deps sglang==0.5.23
  pip install -q pybase64 orjson msgspec pydantic pydantic-core annotated-types typing-inspection pyzmq dill
  # the native CPU kernels (erpo_mega/native) build with cc; CI requires them (ERPO_NATIVE=require)
  if ! command -v cc >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -q gcc libc6-dev >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q gcc libc6-dev >/dev/null; }
  fi
  if ! command -v slurmctld >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      bash tools/slurm_local_cluster.sh install
    else
      echo "setup.sh: Slurm not installed and cannot apt-get it (need root); Slurm tests will be skipped" >&2
    fi
  fi
else
  pip install -q -e .
fi
echo "erpo-mega is set up in .venv (activate with: . .venv/bin/activate)"
