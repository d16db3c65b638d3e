"""What a bench run leaves behind: bench.json, bench.md, bench.png, and a table on the console.

The markdown and the PNG are made from bench.json alone, so `erpo-mega bench merge` can draw
several runs the same way one run is drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

PHASES = ("rollout", "logprob", "train", "sync")


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def label(b: dict) -> str:
    lay = b["layout"]
    return (f"{lay['nodes']}n x {lay['train_devices']}t+{lay['engine_devices']}e tp{lay['tp']} pp{lay['pp']} "
            f"dp{lay['dp']} {lay['placement']}")


def phase_rows(b: dict) -> list[list[str]]:
    rows = []
    for p in PHASES:
        ph = b["phases"][p]
        extra = (f"{_fmt(ph['bytes'] / 2**20)} MiB, {_fmt(ph['bytes_per_s'] / 2**20)} MiB/s" if p == "sync"
                 else "")
        rows.append([p, _fmt(ph["seconds"]), f"{ph['fraction_of_step']:.1%}", _fmt(ph["tokens"]),
                     _fmt(ph["tokens_per_s"]), _fmt(ph["tokens_per_s_per_device"]),
                     _fmt(ph.get("tflops_per_device")), _fmt(ph.get("mfu")), extra])
    st = b["step"]
    rows.append(["step", _fmt(b["step_seconds"]), "100%", _fmt(st["tokens"]), _fmt(st["tokens_per_s"]),
                 _fmt(st["tokens_per_s_per_device"]), "", "",
                 f"overhead {_fmt(b['overhead_seconds'])} s; idle trainer {st['trainer_idle_fraction']:.0%}, "
                 f"rollout {st['rollout_idle_fraction']:.0%}"])
    return rows


HEADER = ["phase", "seconds", "of step", "tokens", "tokens/s", "tokens/s/device", "TFLOP/s/device", "MFU", "notes"]


def markdown(b: dict) -> str:
    lay, dev, mem = b["layout"], b["device"], b["memory"]
    lines = [f"# bench: {label(b)}", "",
             f"model {b['model']['name']}: {b['model']['params']:,} params, "
             f"{b['model']['flops_per_token_fwd']:,} fwd FLOPs/token (+ attention); device {dev['name']} "
             f"(peak {_fmt(dev['peak_tflops'])} TFLOP/s, {dev['peak_source']}); "
             f"{b['workload']['prompts_per_step']} x {b['workload']['samples_per_prompt']} samples of "
             f"{b['workload']['prompt_len']} + {b['workload']['response_len']} tokens; "
             f"mean of {b['timed_steps']} steps after {b['workload']['warmup']} warm-up; {b['time']}", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in phase_rows(b)]
    peak_mem = mem["max_cuda_allocated_bytes"] or mem["max_rss_bytes"]
    kind = "CUDA max allocated" if mem["max_cuda_allocated_bytes"] else "peak RSS"
    lines += ["", f"memory: {kind} {peak_mem / 2**30:.2f} GiB (max over {len(mem['per_rank'])} ranks); "
                  f"layout: {json.dumps(lay)}"]
    if b.get("nvml"):
        for node in b["nvml"]:
            for g in node["gpus"]:
                lines.append(f"nvml {node['host']} gpu{g['gpu']}: util mean {g['util_pct_mean']:.0f}% "
                             f"max {g['util_pct_max']:.0f}%, mem max {g['mem_used_gib_max']:.1f} GiB, "
                             f"power mean {_fmt(g['power_w_mean'])} W")
    return "\n".join(lines) + "\n"


def console(b: dict) -> None:
    """A rich table on stdout (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"erpo-mega bench: {label(b)}")
    for h in HEADER:
        t.add_column(h, justify="left" if h in ("phase", "notes") else "right")
    for r in phase_rows(b):
        t.add_row(*r)
    Console(width=160).print(t)


def plot_phases(runs: list[dict], out: Path, labels: list[str] | None = None) -> Path:
    """Stacked horizontal bars: seconds per phase (+ overhead) of each run's mean step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [label(b) for b in runs]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.6 * len(runs)))
    colors = {"rollout": "#4C72B0", "logprob": "#55A868", "train": "#C44E52", "sync": "#8172B2",
              "overhead": "#999999"}
    left = [0.0] * len(runs)
    for p in (*PHASES, "overhead"):
        vals = [max(0.0, b["overhead_seconds"]) if p == "overhead" else b["phases"][p]["seconds"] for b in runs]
        ax.barh(range(len(runs)), vals, left=left, color=colors[p], label=p)
        left = [a + v for a, v in zip(left, vals)]
    ax.set_yticks(range(len(runs)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per RL step (mean)")
    ax.legend(ncol=5, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_all(b: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "md": out_dir / "bench.md", "png": out_dir / "bench.png"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(b, indent=1, default=float))
    tmp.replace(paths["json"])
    paths["md"].write_text(markdown(b))
    plot_phases([b], paths["png"])
    return paths
