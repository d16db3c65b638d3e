"""What the eval entropy/CDP pass costs: `erpo-mega eval` with `eval.entropy` off and on, alternated.

    python tools/bench_eval_cost.py --config examples/tiny_cpu.yaml --run-dir runs/tiny_cpu --repeats 3

Needs a run directory with a checkpoint (e.g. `erpo-mega train CONFIG train.steps=2`). Each
repeat runs both variants back to back in fresh processes and reads `time/eval` (the whole
evaluation: generation, scoring, and the entropy forward when on) from the eval row it logged,
so the two figures share the machine's conditions; the 1-minute load average is printed with
each pair because on a shared box it moves the numbers more than the code does. Eval rows are
appended to the run's metrics.jsonl: use a scratch run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _eval_seconds(config: str, run_dir: str, entropy: bool, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "erpo_mega.cli", "eval", config, f"run_dir={run_dir}", "progress=false",
           "tensorboard=false", f"eval.entropy={'true' if entropy else 'false'}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"eval failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    return float(result["time/eval"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir", required=True, help="run dir with a checkpoint (scratch: eval rows are appended)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="extra dotted overrides, e.g. eval.num_prompts=100")
    args = p.parse_args()
    off, on = [], []
    for i in range(args.repeats):
        off.append(_eval_seconds(args.config, args.run_dir, False, args.overrides))
        on.append(_eval_seconds(args.config, args.run_dir, True, args.overrides))
        print(f"repeat {i + 1}: entropy off {off[-1]:.2f} s, on {on[-1]:.2f} s "
              f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    a, b = statistics.median(off), statistics.median(on)
    print(f"median eval seconds: entropy off {a:.2f}, on {b:.2f}, ratio {b / a:.2f}x")


if __name__ == "__main__":
    main()
