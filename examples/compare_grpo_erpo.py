"""GRPO vs ERPO on the built-in task: same SFT warm start, same budget, several seeds.

For each seed the SFT warm start runs once and both methods start RL from that same
checkpoint, so the comparison isolates the advantage estimator. Writes `results.md` (final
held-out accuracy, mean response length, final policy entropy, CDP fraction: mean +- std
over seeds) and `curves.png` under --out.

    python examples/compare_grpo_erpo.py --config examples/tiny_cpu.yaml --seeds 1 2 3 --out runs/compare

Tuning ERPO's knobs is the same comparison on the validation split, with named variants
(the SFT warm starts of an earlier comparison are reused with --sft-root):

    python examples/compare_grpo_erpo.py --eval-split validation --sft-root runs/compare --out runs/tune \
        --variant grpo:algo.advantage=grpo --variant beta0.5:algo.erpo.beta=0.5 \
        --variant beta1:algo.erpo.beta=1.0 train.steps=30 train.optim.total_steps=30 eval.every=15
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from erpo_mega.observe.metrics import read_metrics  # noqa: E402

DEFAULT_VARIANTS = {"grpo": ["algo.advantage=grpo"], "erpo": ["algo.advantage=erpo"]}
COLORS = ("tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:gray")


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "erpo_mega.cli", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def _sft_checkpoint(run_dir: Path) -> Path:
    root = run_dir / "sft"
    return root / (root / "latest").read_text().strip()


def _final(run_dir: Path) -> dict:
    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in rows if r["split"] == "eval"]
    train = [r for r in rows if r["split"] == "train"]
    last = train[-5:]  # entropy of the final steps, smoothed over 5 steps
    return {
        "accuracy": evals[-1]["accuracy"],
        "initial_accuracy": evals[0]["accuracy"],
        "eval_len": evals[-1]["response_len_mean"],
        "entropy": statistics.fmean(r["entropy_mean"] for r in last),
        "cdp_fraction": statistics.fmean(r["cdp_fraction"] for r in last),
        "train_reward": statistics.fmean(r["reward_mean"] for r in last),
    }


def _pm(values: list[float], fmt: str = "{:.3f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(statistics.stdev(values))}"


def _plot(runs: dict[str, list[Path]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for (method, method_runs), color in zip(runs.items(), COLORS):
        for i, run in enumerate(method_runs):
            rows = read_metrics(run / "metrics.jsonl")
            ev = [(r["step"], r["accuracy"]) for r in rows if r["split"] == "eval"]
            tr = [r for r in rows if r["split"] == "train"]
            label = method.upper() if i == 0 else None
            axes[0].plot(*zip(*ev), "o-", color=color, alpha=0.7, label=label, markersize=3)
            axes[1].plot([r["step"] for r in tr], [r["entropy_mean"] for r in tr], color=color, alpha=0.6, label=label)
            axes[2].plot([r["step"] for r in tr], [r["response_len_mean"] for r in tr], color=color, alpha=0.6,
                         label=label)
    for ax, title in zip(axes, ("held-out accuracy (greedy)", "policy entropy (train)", "response length (train)")):
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="examples/tiny_cpu.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--eval-split", default="test", choices=["test", "validation"])
    p.add_argument("--sft-root", help="reuse the sft_s<seed> warm starts under this directory (default: --out)")
    p.add_argument("--variant", action="append", metavar="NAME:KEY=VALUE[,KEY=VALUE...]",
                   help="a named run configuration (repeatable); default: grpo and erpo")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every run (e.g. train.steps=30)")
    args = p.parse_args(argv)
    variants = dict(DEFAULT_VARIANTS)
    if args.variant:
        variants = {}
        for spec in args.variant:
            name, _, overrides = spec.partition(":")
            if not name or not all("=" in o for o in overrides.split(",") if o):
                p.error(f"--variant {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
            variants[name] = [o for o in overrides.split(",") if o]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [f"eval.split={args.eval_split}", "progress=false", *args.overrides]
    runs: dict[str, list[Path]] = {m: [] for m in variants}
    for seed in args.seeds:
        sft_dir = Path(args.sft_root or out) / f"sft_s{seed}"
        if not (sft_dir / "sft" / "latest").is_file():
            _cli("sft", args.config, f"run_dir={sft_dir}", f"seed={seed}", *common)
        init = _sft_checkpoint(sft_dir)
        for method, overrides in variants.items():
            run_dir = out / f"{method}_s{seed}"
            if not (run_dir / "summary.json").is_file():
                _cli("train", args.config, f"run_dir={run_dir}", f"seed={seed}", f"model.init_from={init}",
                     "sft.steps=0", *overrides, *common)
            runs[method].append(run_dir)

    finals = {m: [_final(r) for r in runs[m]] for m in variants}
    lines = [f"{' vs '.join(variants)}, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), config `{args.config}`"
             f"{' ' + ' '.join(args.overrides) if args.overrides else ''}, eval split `{args.eval_split}`",
             "", "| method | accuracy after SFT | final accuracy | eval response length | final entropy | "
             "CDP fraction | train reward (last 5) |", "|---|---|---|---|---|---|---|"]
    for m in variants:
        f = finals[m]
        lines.append(f"| {m.upper() if m in DEFAULT_VARIANTS else m} | {_pm([x['initial_accuracy'] for x in f])} | {_pm([x['accuracy'] for x in f])} "
                     f"| {_pm([x['eval_len'] for x in f], '{:.1f}')} | {_pm([x['entropy'] for x in f])} "
                     f"| {_pm([x['cdp_fraction'] for x in f])} | {_pm([x['train_reward'] for x in f])} |")
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(finals, indent=1))
    _plot(runs, out / "curves.png")
    print(table)
    print(f"wrote {out / 'results.md'} and {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
