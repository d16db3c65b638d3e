#!/usr/bin/env bash
# Throughput sweep: each point is one `erpo-mega bench` run through slurm/launch.py (the launcher
# every training job uses) on the first NODES nodes of this allocation; then one merge writes the
# scaling table (speed-up and efficiency against the smallest run) to $OUT/scaling/.
#
#   mkdir -p logs && sbatch --nodes=2 slurm/bench.sh                      # CPU default: tiny config
#   SWEEP="1:2:1 2:2:1 4:2:1 4:2:1:disaggregated" GPUS_PER_NODE=8 TASKS_PER_NODE=8 ENGINE=sglang \
#     MODEL_DIR=/models/Qwen2.5-7B CONFIG=examples/erpo_qwen2.5_7b.yaml sbatch --nodes=4 slurm/bench.sh
#
# SWEEP: one point per word, NODES:TP:PP[:PLACEMENT[:BUCKET_MB]] (PLACEMENT colocated|disaggregated).
# Points run one after another inside this allocation; a failing point is reported and skipped.
# First (COLLECTIVES=1, default) the collectives' bus bandwidth across all nodes -> $OUT/collectives.md.
#SBATCH --job-name=erpo-bench
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=2
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

CONFIG="${CONFIG:-examples/tiny_cpu.yaml}"
SWEEP="${SWEEP-1:1:1 2:1:1}"                    # SWEEP="" with COLLECTIVES=1: the collectives only
STEPS="${STEPS:-3}"                             # timed RL steps per point
WARMUP="${WARMUP:-1}"                           # untimed steps first
BENCH_ARGS="${BENCH_ARGS:-}"                    # overrides for every point, e.g. "bench.model=qwen2.5-7b bench.response_len=1024"
PEAK_TFLOPS="${PEAK_TFLOPS:-}"                  # MFU reference when the device is not in the table
ENGINE="${ENGINE:-none}"                        # none: the trainer starts its own engine (colocated points; disaggregated
                                                # points then use embedded); sglang|embedded: the launcher starts them,
                                                # serving MODEL_DIR (default: a random-init model of the config made here)
MODEL_DIR="${MODEL_DIR:-}"
ENGINE_ARGS="${ENGINE_ARGS:---num-threads 1}"
ENGINE_TIMEOUT="${ENGINE_TIMEOUT:-600}"
TASKS_PER_NODE="${TASKS_PER_NODE:-2}"           # training ranks per node (GPUs per node on GPU nodes)
GPUS_PER_NODE="${GPUS_PER_NODE:-0}"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PYTHON="${PYTHON:-python3}"

ERPO_HOME="${ERPO_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
[[ -f "$ERPO_HOME/slurm/launch.py" ]] || ERPO_HOME="${SLURM_SUBMIT_DIR:-$PWD}"
cd "$ERPO_HOME"
OUT="${OUT:-runs/bench-${SLURM_JOB_ID:-local}}"

[[ -n "${SLURM_JOB_NODELIST:-}" ]] || { echo "bench.sh: run me with sbatch (no SLURM_JOB_NODELIST)" >&2; exit 2; }
mapfile -t ALL_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
# Launcher-started engines need a model dir to serve: without MODEL_DIR, a random-init one of the
# config's shape, made once for the whole sweep.
ensure_model() {
    if [[ -z "$MODEL_DIR" ]]; then
        MODEL_DIR="$OUT/model"
        [[ -f "$MODEL_DIR/config.json" ]] || "$PYTHON" -m erpo_mega.bench.make_model "$CONFIG" $BENCH_ARGS --out "$MODEL_DIR"
    fi
}
export MODEL_DIR CONFIG ENGINE ENGINE_ARGS ENGINE_TIMEOUT TASKS_PER_NODE GPUS_PER_NODE OMP_NUM_THREADS

failed=0
if [[ "${COLLECTIVES:-1}" != 0 ]]; then
    # Component: collective bus bandwidth across all nodes of the allocation, one rank per node
    # (nccl-tests' busbw; NCCL on GPU nodes, gloo on CPU).
    master=$(scontrol show node "${ALL_NODES[0]}" | grep -oP 'NodeAddr=\K\S+' || echo "${ALL_NODES[0]}")
    mkdir -p "$OUT"
    echo "[bench.sh $(date +%H:%M:%S)] collectives across ${#ALL_NODES[@]} node(s)"
    MASTER_ADDR="$master" MASTER_PORT=$((29500 + ${SLURM_JOB_ID:-0} % 1000)) \
        srun --overlap --nodes="${#ALL_NODES[@]}" --ntasks="${#ALL_NODES[@]}" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        "$PYTHON" -m erpo_mega.bench.collectives --sizes-mb ${COLLECTIVE_SIZES_MB:-1 16 128} \
        --json "$OUT/collectives.json" | tee "$OUT/collectives.md" || { echo "[bench.sh] collectives FAILED" >&2; failed=1; }
fi
slot=0
for point in $SWEEP; do
    slot=$((slot + 1))
    IFS=: read -r nodes tp pp placement bucket <<< "$point"
    placement="${placement:-colocated}"
    if [[ -z "$nodes" || -z "$tp" || -z "$pp" ]] || (( nodes > ${#ALL_NODES[@]} )); then
        echo "bench.sh: bad SWEEP point '$point' (NODES:TP:PP[:PLACEMENT[:BUCKET_MB]], nodes <= ${#ALL_NODES[@]})" >&2
        failed=1; continue
    fi
    engine="$ENGINE"
    [[ "$placement" == disaggregated && "$engine" == none ]] && engine=embedded  # engines on their own nodes
    [[ "$engine" == none ]] || ensure_model
    subset=$(IFS=,; echo "${ALL_NODES[*]:0:nodes}")
    name="n${nodes}-tp${tp}-pp${pp}-${placement}${bucket:+-b${bucket}}"
    cmd="$PYTHON -m erpo_mega.cli bench $CONFIG --steps $STEPS --warmup $WARMUP ${PEAK_TFLOPS:+--peak-tflops $PEAK_TFLOPS}"
    cmd+=" bench.nodes=$nodes bench.placement=$placement ${bucket:+rollout.bucket_mb=$bucket} $BENCH_ARGS"
    echo "[bench.sh $(date +%H:%M:%S)] point $name on $subset"
    # The launcher plans over the nodes it is given: this point's first NODES nodes.
    if ! SLURM_JOB_NODELIST="$subset" SLURM_NODELIST="$subset" SLURM_JOB_NUM_NODES="$nodes" SLURM_NNODES="$nodes" \
        PLACEMENT="$placement" TP="$tp" PP="$pp" ENGINE="$engine" MODEL_DIR="$MODEL_DIR" RUN_DIR="$OUT/$name" \
        ERPO_PORT_SLOT="$slot" \
        TRAIN_CMD="$cmd" \
        "$PYTHON" slurm/launch.py; then
        echo "[bench.sh] point $name FAILED (logs in $OUT/$name/logs)" >&2
        failed=1
    fi
done
if [[ -n "$SWEEP" ]]; then
    "$PYTHON" -m erpo_mega.cli bench merge "$OUT" --out "$OUT/scaling" || failed=1
fi
exit "$failed"
