"""`erpo-mega bench merge RUN ... --out DIR`: per-run bench.json files -> one scaling table.

Speed-up is end-to-end throughput (tokens of the step per second) against the run with the
fewest devices; efficiency is speed-up / (devices / baseline devices), so 1.0 is perfect
scaling whether the sweep keeps the batch fixed (strong) or grows it with the nodes (weak).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from erpo_mega.bench.report import PHASES, label, plot_phases


class MergeError(ValueError):
    pass


def find_runs(paths: list[str]) -> list[Path]:
    """bench.json files: given directly, or found anywhere under the given directories."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(p.rglob("bench.json"))
            if not found:
                raise MergeError(f"{p}: no bench.json under this directory")
            out += found
        else:
            raise MergeError(f"{p}: no such file or directory")
    return out


def load(path: Path) -> dict:
    try:
        b = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MergeError(f"{path}: not a readable bench.json ({e})") from None
    missing = [k for k in ("layout", "phases", "step_seconds", "step") if k not in b]
    if missing:
        raise MergeError(f"{path}: not a bench.json (missing {', '.join(missing)})")
    b["_path"] = str(path)
    return b


def scaling_rows(runs: list[dict]) -> list[dict]:
    runs = sorted(runs, key=lambda b: (b["layout"]["devices"], b["layout"]["nodes"], b["_path"]))
    base = runs[0]
    rows = []
    for b in runs:
        speedup = b["step"]["tokens_per_s"] / base["step"]["tokens_per_s"]
        ideal = b["layout"]["devices"] / base["layout"]["devices"]
        rows.append({"run": label(b), "path": b["_path"], "nodes": b["layout"]["nodes"],
                     "devices": b["layout"]["devices"], "tp": b["layout"]["tp"], "pp": b["layout"]["pp"],
                     "dp": b["layout"]["dp"], "placement": b["layout"]["placement"],
                     "step_seconds": b["step_seconds"], "tokens_per_s": b["step"]["tokens_per_s"],
                     "tokens_per_s_per_device": b["step"]["tokens_per_s_per_device"],
                     **{f"{p}_seconds": b["phases"][p]["seconds"] for p in PHASES},
                     "train_mfu": b["phases"]["train"].get("mfu"), "speedup": speedup, "ideal": ideal,
                     "efficiency": speedup / ideal})
    return rows


def markdown(rows: list[dict]) -> str:
    head = ["run", "nodes", "devices", "step s", "rollout s", "logprob s", "train s", "sync s", "tokens/s",
            "tokens/s/device", "speed-up", "efficiency"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["run"], str(r["nodes"]), str(r["devices"]), f"{r['step_seconds']:.3f}",
            *(f"{r[f'{p}_seconds']:.3f}" for p in PHASES), f"{r['tokens_per_s']:.1f}",
            f"{r['tokens_per_s_per_device']:.1f}", f"{r['speedup']:.2f}x", f"{r['efficiency']:.0%}"]) + " |")
    return "\n".join(lines) + "\n"


def merge(paths: list[str], out: Path) -> dict[str, Path]:
    runs = [load(p) for p in find_runs(paths)]
    rows = scaling_rows(runs)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows)
    (out / "scaling.md").write_text(md)
    (out / "scaling.json").write_text(json.dumps(rows, indent=1))
    by_path = {b["_path"]: b for b in runs}
    plot_phases([by_path[r["path"]] for r in rows], out / "scaling.png")
    print(md, end="")
    return {"md": out / "scaling.md", "json": out / "scaling.json", "png": out / "scaling.png"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="erpo-mega bench merge", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="bench.json files or directories holding them (searched recursively)")
    p.add_argument("--out", default="bench_scaling", help="output dir: scaling.md, scaling.json, scaling.png")
    args = p.parse_args(argv)
    try:
        paths = merge(args.runs, Path(args.out))
    except MergeError as e:
        print(f"erpo-mega bench merge: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
    return 0
