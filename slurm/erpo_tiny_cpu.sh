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
# the launcher starts one engine per task slot and the router first, as the GPU job does with SGLang.
ENGINE="${ENGINE:-none}"
MODEL_DIR="${MODEL_DIR:-}"
ENGINE_ARGS="${ENGINE_ARGS:---num-threads 1}"
ENGINE_TIMEOUT="${ENGINE_TIMEOUT:-300}"
PLACEMENT=colocated
GPUS_PER_NODE=0                                 # a CPU job: no GPU binding
TASKS_PER_NODE=2
TRAIN_CMD="${TRAIN_CMD:-}"                      # default: erpo-mega train $CONFIG
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"         # two ranks plus engines share a few cores
PYTHON="${PYTHON:-python3}"
# ---- end of variables: everything below is the same in every job script (a test checks it)

# sbatch runs a spooled copy of this file, so find the checkout from the submit directory.
ERPO_HOME="${ERPO_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
[[ -f "$ERPO_HOME/slurm/launch.py" ]] || ERPO_HOME="${SLURM_SUBMIT_DIR:-$PWD}"
cd "$ERPO_HOME"

export MODEL_DIR CONFIG PLACEMENT ROLLOUT_NODES GPUS_PER_NODE TASKS_PER_NODE TP PP ENGINE ENGINE_TP \
    ENGINE_DETERMINISTIC ENGINE_ARGS ENGINE_TIMEOUT CPUS_PER_TASK TRAIN_CMD OMP_NUM_THREADS
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"   # Megatron TP comm/compute overlap
exec "$PYTHON" slurm/launch.py "$@"
