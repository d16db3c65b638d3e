#!/usr/bin/env bash
# The 7B job's twin on CPUs: slurm/erpo_7b.sh's exact topology scaled down, for CI on the 2-node local
# Slurm (tools/slurm_local_cluster.sh up --nodes 2). Node 1 trains (TP 2, bf16, from an HF MODEL_DIR);
# node 2 runs two embedded engines (SGLang's protocol) and the router; weights sync by broadcast.
#   MODEL_DIR=<HF dir> sbatch slurm/erpo_twin_cpu.sh            then, to continue:  ... --resume
# It differs from slurm/erpo_7b.sh only in the lines above "end of variables".
#SBATCH --job-name=erpo-twin-cpu
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=2
#SBATCH --exclusive
#SBATCH --time=00:30:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

# ---- what to run (each can be overridden from the environment, e.g. sbatch --export=ALL,TP=1)
MODEL_DIR="${MODEL_DIR:-}"                             # HF directory the engines serve and the trainer loads
CONFIG="${CONFIG:-examples/twin_cpu.yaml}"
PLACEMENT="${PLACEMENT:-disaggregated}"                # node 1 trains, node 2 serves rollouts
ROLLOUT_NODES="${ROLLOUT_NODES:-}"                     #   (default half the nodes)
GPUS_PER_NODE="${GPUS_PER_NODE:-0}"                    # a CPU job: no GPU binding
TASKS_PER_NODE="${TASKS_PER_NODE:-2}"                  # training ranks per node; also engine slots per node
TP="${TP:-2}"                                          # Megatron tensor / pipeline parallel; DP = ranks / (TP*PP)
PP="${PP:-1}"
ENGINE="${ENGINE:-embedded}"
ENGINE_TP="${ENGINE_TP:-1}"                            # one server (dp 1) per ENGINE_TP slots: two per node
ENGINE_DETERMINISTIC="${ENGINE_DETERMINISTIC:-0}"      # (SGLang only; the embedded engine always honours sampling_seed)
ENGINE_ARGS="${ENGINE_ARGS:---num-threads 1 --skip-tokenizer-init}"
ENGINE_TIMEOUT="${ENGINE_TIMEOUT:-300}"                # seconds for engines to load and answer /health
CPUS_PER_TASK="${CPUS_PER_TASK:-}"                     # CPU cores per training rank (unset: the node's CPUs / ranks)
TRAIN_CMD="${TRAIN_CMD:-}"                             # default: erpo-mega train $CONFIG
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PYTHON="${PYTHON:-python3}"                            # the environment with erpo-mega, megatron-core and sglang-router
# ---- end of variables: everything below is the same in every job script (a test checks it)

# sbatch runs a spooled copy of this file, so find the checkout from the submit directory.
ERPO_HOME="${ERPO_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
[[ -f "$ERPO_HOME/slurm/launch.py" ]] || ERPO_HOME="${SLURM_SUBMIT_DIR:-$PWD}"
cd "$ERPO_HOME"

export MODEL_DIR CONFIG PLACEMENT ROLLOUT_NODES GPUS_PER_NODE TASKS_PER_NODE TP PP ENGINE ENGINE_TP \
    ENGINE_DETERMINISTIC ENGINE_ARGS ENGINE_TIMEOUT CPUS_PER_TASK TRAIN_CMD OMP_NUM_THREADS
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"   # Megatron TP comm/compute overlap
exec "$PYTHON" slurm/launch.py "$@"
