"""What ERPO does to one prompt group, in numbers.

Four responses to one prompt (two correct, two wrong), with made-up per-token entropies.
Response 0 has a clear pivot: a high-entropy token where it chose the right method.
Response 2 has one where it went wrong. GRPO gives every token of a response the same
advantage; ERPO moves credit (and blame) towards such pivots and keeps each response's
mean advantage equal to its GRPO advantage.

    python examples/toy_advantages.py
"""

from __future__ import annotations

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from erpo_mega.algo import ERPOConfig, erpo_terms, erpo_token_advantages, grpo_advantages

RESPONSES = [  # (reward, [(token, entropy), ...])
    (1.0, [("Let", 0.2), ("x", 0.3), ("=", 0.1), ("2y", 0.4), ("so", 0.3), ("factor", 2.6), ("->", 0.2), ("6", 0.1)]),
    (1.0, [("We", 0.3), ("need", 0.4), ("x", 0.2), ("so", 0.5), ("x", 0.3), ("=", 0.1), ("6", 0.2)]),
    (0.0, [("Try", 0.6), ("x", 0.4), ("=", 0.2), ("y", 0.5), ("then", 0.4), ("guess", 2.3), ("->", 0.3), ("5", 0.2)]),
    (0.0, [("x", 0.5), ("is", 0.4), ("about", 0.9), ("5", 0.3)]),
]


def build_batch():
    width = max(len(toks) for _, toks in RESPONSES)
    rewards = torch.tensor([r for r, _ in RESPONSES])
    entropy = torch.zeros(len(RESPONSES), width)
    mask = torch.zeros(len(RESPONSES), width, dtype=torch.bool)
    for i, (_, toks) in enumerate(RESPONSES):
        entropy[i, : len(toks)] = torch.tensor([h for _, h in toks])
        mask[i, : len(toks)] = True
    return rewards, entropy, mask, torch.zeros(len(RESPONSES), dtype=torch.long)


def num(value: float, digits: int = 2) -> str:
    return f"{round(value, digits) + 0.0:+.{digits}f}"  # + 0.0 turns -0.0 into 0.0


def bar(value: float, scale: float) -> str:
    n = round(abs(value) * scale)
    return ("[green]" + "+" * n + "[/]") if value > 0 else ("[red]" + "-" * n + "[/]")


def main() -> None:
    console = Console()
    cfg = ERPOConfig(num_buckets=4)
    rewards, entropy, mask, group_ids = build_batch()
    grpo = grpo_advantages(rewards, group_ids)
    adv, stats = erpo_token_advantages(rewards, entropy, mask, group_ids, cfg)
    terms = erpo_terms(rewards, entropy, mask, group_ids, cfg)

    table = Table(title=f"One prompt group, token by token\n(beta={cfg.beta}, K={cfg.num_buckets} buckets, "
                        f"tau={cfg.tau}; bold rows are CDPs: z > tau)", box=box.SIMPLE_HEAD,
                  collapse_padding=True, pad_edge=False)
    for name in ("resp", "r", "A grpo", "token", "H", "z", "W", "b", "s", "A erpo", ""):
        table.add_column(name, justify="left" if name in ("token", "") else "right", no_wrap=True)
    for i, (reward, toks) in enumerate(RESPONSES):
        for t, (tok, h) in enumerate(toks):
            head = (str(i), f"{reward:.0f}", f"{grpo[i].item():+.3f}") if t == 0 else ("", "", "")
            a = adv[i, t].item()
            cells = (*head, tok, f"{h:.1f}", num(terms.z[i, t].item()), f"{terms.gate[i, t].item():.2f}",
                     str(terms.bucket[i, t].item()), num(terms.bucket_score[i, t].item()), num(a, 3), bar(a, 3.0))
            table.add_row(*cells, style="bold" if terms.cdp[i, t] else None)
        mean = ((adv[i] * mask[i]).sum() / mask[i].sum()).item()
        table.add_row("", "", "", "[dim]mean[/]", "", "", "", "", "", f"[dim]{mean:+.3f}[/]", "",
                      end_section=True)
    console.print(table)
    console.print("H entropy, z group z-score, W = sigmoid(gamma z) gate, b progress bucket, s bucket z-score.\n")

    summary = Table(title="Statistics the trainer logs", box=box.SIMPLE_HEAD)
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    for key in ("cdp_fraction", "cdp_count", "entropy_mean", "entropy_mean_cdp", "gate_mean", "clamp_fraction",
                "adv_abs_mean", "outcome_adv_abs_mean"):
        summary.add_row(key, f"{stats[key]:.3f}")
    summary.add_row("cdp_bucket_hist", "  ".join(f"{v:.2f}" for v in stats["cdp_bucket_hist"]))
    console.print(summary)
    console.print("GRPO gives every token of a response the same advantage. ERPO moves a response's credit "
                  "(or blame) towards its high-entropy pivots, judged against tokens at the same progress in "
                  "the other responses; each response's mean stays its GRPO advantage unless the sign clamp bites.")


if __name__ == "__main__":
    main()
