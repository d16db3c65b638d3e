#!/usr/bin/env bash
# The tiny CPU example through the same launcher as the 7B job: 2 training ranks (gloo) on one
# node with a colocated embedded rollout engine. Runs on the local test cluster:
#   tools/slurm_local_cluster.sh up && export SLURM_CONF=/tmp/erpo-slurm/slurm.conf
#   mkdir -p logs && sbatch slurm/erpo_tiny_cpu.sh [dotted.key=value ...]
#SBATCH --job-name=erpo-tiny-cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --time=00:30:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

CONFIG="${CONFIG:-examples/tiny_cpu.yaml}"
# ENGINE=none: the trainer starts its own embedded engine (the tiny model is trained from scratch,
# so nothing exists to serve before the trainer builds it). ENGINE=embedded with MODEL_DIR=<HF dir>:
# the launcher starts the engine and router first, exactly as the GPU job does with SGLang.
ENGINE="${ENGINE:-none}"
MODEL_DIR="${MODEL_DIR:-}"
ENGINE_ARGS="${ENGINE_ARGS:---num-threads 1}"
ENGINE_TIMEOUT="${ENGINE_TIMEOUT:-300}"
PLACEMENT=colocated
TASKS_PER_NODE=2
TRAIN_CMD="${TRAIN_CMD:-}"                      # default: erpo-mega train $CONFIG
PYTHON="${PYTHON:-python3}"

ERPO_HOME="${ERPO_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
[[ -f "$ERPO_HOME/slurm/launch.py" ]] || ERPO_HOME="${SLURM_SUBMIT_DIR:-$PWD}"
cd "$ERPO_HOME"

export CONFIG MODEL_DIR PLACEMENT ENGINE ENGINE_ARGS ENGINE_TIMEOUT TASKS_PER_NODE TRAIN_CMD
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # two ranks plus an engine share a few cores
exec "$PYTHON" slurm/launch.py "$@"
