"""`erpo-mega plot RUN_DIR [RUN_DIR ...]`: PNG curves from metrics.jsonl files."""

from __future__ import annotations

from pathlib import Path

from erpo_mega.observe.metrics import read_metrics

DEFAULT_KEYS = ("reward_mean", "accuracy", "response_len_mean", "entropy_mean", "entropy_mean_cdp",
                "cdp_fraction", "kl", "grad_norm", "clip_frac")


def plot_runs(run_dirs: list[str | Path], out: str | Path | None = None, keys: tuple[str, ...] = DEFAULT_KEYS) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for d in run_dirs:
        path = Path(d) / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no metrics.jsonl in run directory {d}")
        runs.append((Path(d).name, read_metrics(path)))
    present = [k for k in keys if any(k in r for _, rows in runs for r in rows)]
    if not present:
        raise ValueError(f"none of the metrics {list(keys)} appear in {[str(d) for d in run_dirs]}")
    ncol = 3
    nrow = (len(present) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.2 * nrow), squeeze=False)
    for ax, key in zip(axes.flat, present):
        for name, rows in runs:
            for split, style in (("train", "-"), ("eval", "o--")):
                pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and isinstance(r.get(key), (int, float))]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, style, label=f"{name} {split}", markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dirs[0]) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
