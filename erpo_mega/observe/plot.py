"""`erpo-mega plot RUN_DIR [RUN_DIR ...]`: PNG curves from metrics.jsonl files.

Besides the training curves, every eval set (`eval.sets`, metric names `SET/avg@k`, `SET/pass@k`)
gets a panel of its avg@k and pass@k over steps, so benchmark scores can be read off like a
paper's table at any step.
"""

from __future__ import annotations

import re
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
    panels = [(k, [(k, "")], ("train", "eval")) for k in present] + eval_set_panels(runs)
    if not panels:
        raise ValueError(f"none of the metrics {list(keys)} appear in {[str(d) for d in run_dirs]}")
    ncol = 3
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.2 * nrow), squeeze=False)
    for ax, (title, series, splits) in zip(axes.flat, panels):
        for name, rows in runs:
            for key, label in series:
                for split, style in (("train", "-"), ("eval", "o--")):
                    if split not in splits:
                        continue
                    pts = [(r["step"], r[key]) for r in rows
                           if r.get("split") == split and isinstance(r.get(key), (int, float))]
                    if pts:
                        xs, ys = zip(*pts)
                        ax.plot(xs, ys, style, label=f"{name} {label or split}", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dirs[0]) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


_AT_K = re.compile(r"^(?P<set>[^/]+)/(?P<kind>avg|pass)@(?P<k>\d+)$")


def eval_set_panels(runs: list[tuple[str, list[dict]]]) -> list[tuple[str, list[tuple[str, str]], tuple[str, ...]]]:
    """One panel per eval set: (title, [(metric key, legend label)], splits) with its avg@k and pass@k."""
    found: dict[str, set[tuple[str, int]]] = {}
    for _, rows in runs:
        for r in rows:
            if r.get("split") != "eval":
                continue
            for key in r:
                m = _AT_K.match(key)
                if m:
                    found.setdefault(m["set"], set()).add((m["kind"], int(m["k"])))
    panels = []
    for name in sorted(found):
        ordered = sorted(found[name], key=lambda kk: (kk[0] != "avg", kk[1]))
        panels.append((f"eval {name}", [(f"{name}/{kind}@{k}", f"{kind}@{k}") for kind, k in ordered], ("eval",)))
    return panels
