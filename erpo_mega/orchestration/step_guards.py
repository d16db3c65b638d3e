"""Guards of one RL step: what to do with samples that carry nothing to learn from, and how
to tell that the rollout engine scored tokens under another distribution than the trainer.

Pure functions over the step's plain data, so each rule is tested by hand and every
training rank (which holds the same broadcast rollout) takes the same decision.
"""

from __future__ import annotations

import torch

ROLLOUT_FIELDS = ("prompt_ids", "response_ids", "rollout_logp", "rewards", "group_ids", "truncated")


class RolloutProblem(RuntimeError):
    """The rollout cannot be trained on as it is (e.g. the engine's log-probs do not match the
    trainer's); the run stops before an update is made from it."""


def drop_empty_responses(ro: dict) -> tuple[dict, int, int]:
    """Remove zero-length responses (nothing to score, no token to train).

    Returns the remaining rollout, the number of empty responses, and the number of samples
    removed in all: a group left with a single response is removed too, since a lone sample has
    no group baseline (its group-relative advantage is zero, so it could not change the update).
    The other samples keep their rewards; group statistics are taken over what remains.
    """
    counts: dict[int, int] = {}
    for g, r in zip(ro["group_ids"], ro["response_ids"]):
        if len(r) > 0:
            counts[g] = counts.get(g, 0) + 1
    keep = [i for i, (g, r) in enumerate(zip(ro["group_ids"], ro["response_ids"])) if len(r) > 0 and counts[g] > 1]
    n_empty = sum(1 for r in ro["response_ids"] if len(r) == 0)
    if n_empty == 0:
        return ro, 0, 0
    out = dict(ro)
    for key in ROLLOUT_FIELDS:
        out[key] = [ro[key][i] for i in keep]
    return out, n_empty, len(ro["response_ids"]) - len(keep)


def minibatch_indices(n: int, k: int) -> list[list[int]]:
    """`k` contiguous, non-empty mini-batches of `n` samples whose sizes differ by at most one.

    (ceil(n / k) per mini-batch left the last one empty for n=4, k=3, so one update fewer ran.)
    """
    if k < 1 or n < k:
        raise ValueError(f"updates_per_step={k} needs at least {k} samples per step, got {n}")
    base, extra = divmod(n, k)
    out, start = [], 0
    for u in range(k):
        size = base + (1 if u < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def merge_update_metrics(per_update: list[dict[str, float]], skipped: int) -> dict[str, float]:
    """One row from the updates of a step: means over the updates that ran (max for `*_max`,
    sums for the counts `num_*`), plus how many ran and how many were skipped because their
    mini-batch had no token in the loss (every response truncated under `drop_truncated`)."""
    merged: dict[str, float] = {}
    ran = len(per_update)
    for m in per_update:
        for key, v in m.items():
            if key.endswith("_max"):
                merged[key] = max(merged.get(key, float("-inf")), v)
            elif key.startswith("num_"):
                merged[key] = merged.get(key, 0.0) + v
            else:
                merged[key] = merged.get(key, 0.0) + v / ran
    merged["updates_run"] = float(ran)
    merged["updates_skipped"] = float(skipped)
    return merged


def rollout_logp_gap(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |trainer log-prob - engine log-prob| over the response tokens (nats)."""
    m = mask.bool()
    n = int(m.sum())
    if n == 0:
        return 0.0
    return float(((old_logp.float() - rollout_logp.float()).abs() * m).sum() / n)


def check_rollout_logp_gap(gap: float, bound: float | None, temperature: float, step: int) -> None:
    """Stop when the engine's log-probs are not the trainer's distribution at the first step.

    Right after a weight push both sides hold the same weights, so the gap is rounding only
    (about 1e-6 nats in fp32, a few 1e-2 in bf16). A larger gap means the engine scores
    tokens under another distribution: most often log-probs of the untempered logits
    (SGLang with SGLANG_RETURN_ORIGINAL_LOGPROB=1) while the trainer uses logits / T, which
    would make every ratio, TIS weight and mismatch metric wrong for the whole run.
    """
    if bound is None or gap <= bound:
        return
    raise RolloutProblem(
        f"RL step {step}: the engine's log-probs differ from the trainer's by {gap:.4f} nats per token on "
        f"average (bound rollout.max_logp_gap={bound}), although both hold the same weights. The engine is "
        f"scoring another distribution: check that it returns log-probs at the sampling temperature "
        f"({temperature}) -- e.g. SGLANG_RETURN_ORIGINAL_LOGPROB must be unset -- and that the engine and "
        "trainer load the same model and dtype. Raise rollout.max_logp_gap (or set it to null) only if "
        "the gap is known rounding.")
