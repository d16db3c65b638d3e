#!/usr/bin/env bash
# One command for the lent GPU machine (see ../shared/docs/PLATFORM.md, "The lent GPU machine":
# Python 3.12, torch 2.11 + CUDA, transformers/safetensors/pytest present; no registry, no
# megatron-core; at most 64 MiB carried). Two halves:
#
#   bash tools/gpu_check.sh prepare     # HERE (registry access): download the wheels into .whl/
#   bash tools/gpu_check.sh run         # THERE, with .whl/ carried (device tool: carry [".whl"])
#
# `run` installs the carried wheels (--no-index), then, in well under 10 minutes on one H100/H200:
#   1. the `gpu` tests (tests/**: marked gpu), which include defect 1's bf16 load-then-step test
#      on CUDA, optimizer resume on CUDA, and the TE-spec checks when transformer_engine exists;
#   2. a 2-step embedded RL run with model.bf16=true and a checkpoint, then --resume to step 3;
#   3. memory/throughput of Qwen2.5-7B-shaped layers (2 and 4 layers, 5k and 16k tokens).
# Step timeouts sum to < 600 s (the device tool's per-call limit). Figures and logs go to $OUT (default ./gpu_check_out); summary.txt collects the key lines.
# Exit status: non-zero if any part failed (every part runs regardless).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
MODE=${1:-run}
WHEELS=$REPO/.whl
PY=${PYTHON:-python3}

if [[ "$MODE" == "prepare" ]]; then
  # pure-Python / abi3 wheels for the GPU machine's Python 3.12 (megatron-core 0.16.1 is
  # undeclared about psutil; requests + its deps for the SGLang-protocol client)
  mkdir -p "$WHEELS"
  "$PY" -m pip download megatron-core==0.16.1 psutil requests urllib3 idna certifi charset-normalizer \
      --no-deps --python-version 3.12 --only-binary=:all: -d "$WHEELS" -q || exit 1
  du -sh "$WHEELS"
  exit 0
fi
[[ "$MODE" == "run" ]] || { echo "usage: $0 prepare|run" >&2; exit 2; }

OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
FAILED=0
note() { echo "$*" | tee -a "$SUMMARY"; }
step() {  # step NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, record pass/fail
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  note "[$name] rc=$rc in $((SECONDS - t0)) s"
  [[ $rc -eq 0 ]] || FAILED=1
  return $rc
}

note "gpu_check $(date -u +%FT%TZ) on $(hostname)"
"$PY" - <<'EOF' | tee -a "$SUMMARY"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
EOF

if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  # into a private dir on PYTHONPATH: works with a system python, a venv or a read-only site
  step install 60 "$PY" -m pip install --no-index --no-deps --target "$REPO/.gpu_site" "$WHEELS"/*.whl
else
  note "no wheels in $WHEELS (run 'prepare' here first and carry .whl)"; FAILED=1
fi
export PYTHONPATH=$REPO:$REPO/.gpu_site${PYTHONPATH:+:$PYTHONPATH}
export ERPO_LOG_LEVEL=${ERPO_LOG_LEVEL:-WARNING}
"$PY" -c "import transformer_engine" > /dev/null 2>&1 && note "transformer_engine: present" \
  || note "transformer_engine: absent (TE-spec checks skip)"

# 1. gpu tests (pytest-timeout may be absent there: no --timeout flag)
step gpu_tests 180 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests
tail -n 3 "$OUT/gpu_tests.log" | tee -a "$SUMMARY"

# 2. 2-step embedded run in bf16 with a checkpoint, then --resume one more step
RUN=$OUT/run_bf16
rm -rf "$RUN"
ARGS=(examples/tiny_cpu.yaml "run_dir=$RUN" model.bf16=true sft.steps=0 train.steps=2
      checkpoint.every=1 eval.every=0 eval.num_prompts=16 tensorboard=false progress=false
      rollout.prompts_per_step=8 rollout.max_new_tokens=32)
step run_bf16 100 "$PY" -m erpo_mega.cli train "${ARGS[@]}" \
  && step resume_bf16 80 "$PY" -m erpo_mega.cli train "${ARGS[@]}" train.steps=3 --resume
"$PY" - "$RUN" <<'EOF' | tee -a "$SUMMARY"
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()] \
    if (run / "metrics.jsonl").is_file() else []
train = [r for r in rows if r.get("split") == "train"]
print("bf16 run: steps", [r["step"] for r in train],
      "rollout versions", [r.get("rollout_weight_version") for r in train],
      "losses", [round(r.get("loss", float("nan")), 4) for r in train])
EOF

# 3. Qwen2.5-7B-shaped layers: memory and throughput (recompute off, then full)
step layers_7b 120 "$PY" tools/bench_7b_layers.py --layers 2 4 --tokens 5120 16384 --json "$OUT/layers_7b.json"
grep -E "^ +[0-9]|->" "$OUT/layers_7b.log" | tee -a "$SUMMARY"
step layers_7b_baseline 50 "$PY" tools/bench_7b_layers.py --layers 2 --tokens 5120 16384 --attention megatron \
  --json "$OUT/layers_7b_baseline.json"
grep -E "^ +[0-9]|->" "$OUT/layers_7b_baseline.log" | sed 's/^/[megatron attention] /' | tee -a "$SUMMARY"
step layers_7b_recompute 50 "$PY" tools/bench_7b_layers.py --layers 2 4 --tokens 16384 --recompute full \
  --json "$OUT/layers_7b_recompute.json"
grep -E "^ +[0-9]|->" "$OUT/layers_7b_recompute.log" | tee -a "$SUMMARY"

note "gpu_check done: $([[ $FAILED -eq 0 ]] && echo ALL PASSED || echo SOME PARTS FAILED) (logs in $OUT)"
exit $FAILED
