#!/usr/bin/env bash
# ERPO on Qwen2.5-7B: Megatron-Core training ranks + SGLang rollout servers behind sglang-router.
#   mkdir -p logs && sbatch slurm/erpo_7b.sh                 (submit from the repository root)
#   sbatch --nodes=4 --export=ALL,ROLLOUT_NODES=2 slurm/erpo_7b.sh
#   DRY_RUN=1 ERPO_NODELIST="node[01-04]" bash slurm/erpo_7b.sh   (print the placement only)
# Its CPU twin, slurm/erpo_twin_cpu.sh, differs only in the lines above "end of variables".
#SBATCH --job-name=erpo-7b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

# ---- what to run (each can be overridden from the environment, e.g. sbatch --export=ALL,TP=4)
MODEL_DIR="${MODEL_DIR:-/models/Qwen2.5-7B-Instruct}"   # HF directory the engines serve and the trainer loads
CONFIG="${CONFIG:-examples/erpo_qwen2.5_7b.yaml}"
PLACEMENT="${PLACEMENT:-disaggregated}"                # disaggregated: last ROLLOUT_NODES nodes serve rollouts
ROLLOUT_NODES="${ROLLOUT_NODES:-}"                     #   (default half the nodes; colocated: engines share the training GPUs)
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"                    # each rank is bound to one GPU, each engine to ENGINE_TP
TASKS_PER_NODE="${TASKS_PER_NODE:-$GPUS_PER_NODE}"     # training ranks per node
TP="${TP:-2}"                                          # Megatron tensor / pipeline parallel; DP = ranks / (TP*PP)
PP="${PP:-1}"
ENGINE="${ENGINE:-sglang}"
ENGINE_TP="${ENGINE_TP:-1}"                            # SGLang --tp-size; one server (dp 1) per ENGINE_TP GPUs
ENGINE_DETERMINISTIC="${ENGINE_DETERMINISTIC:-0}"      # 1: --enable-deterministic-inference (seeded, slower); 0: GPU rollouts are not seeded
ENGINE_ARGS="${ENGINE_ARGS:---mem-fraction-static 0.7}"
ENGINE_TIMEOUT="${ENGINE_TIMEOUT:-1800}"               # seconds for engines to load and answer /health
CPUS_PER_TASK="${CPUS_PER_TASK:-}"                     # CPU cores per training rank (unset: the node's CPUs / ranks)
TRAIN_CMD="${TRAIN_CMD:-}"                             # default: erpo-mega train $CONFIG
OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
PYTHON="${PYTHON:-python3}"                            # the environment with erpo-mega, megatron-core and sglang
# ---- end of variables: everything below is the same in every job script (a test checks it)

# sbatch runs a spooled copy of this file, so find the checkout from the submit directory.
ERPO_HOME="${ERPO_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
[[ -f "$ERPO_HOME/slurm/launch.py" ]] || ERPO_HOME="${SLURM_SUBMIT_DIR:-$PWD}"
cd "$ERPO_HOME"

export MODEL_DIR CONFIG PLACEMENT ROLLOUT_NODES GPUS_PER_NODE TASKS_PER_NODE TP PP ENGINE ENGINE_TP \
    ENGINE_DETERMINISTIC ENGINE_ARGS ENGINE_TIMEOUT CPUS_PER_TASK TRAIN_CMD OMP_NUM_THREADS
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"   # Megatron TP comm/compute overlap
exec "$PYTHON" slurm/launch.py "$@"
