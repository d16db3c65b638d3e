"""Held-out evaluation through the same engines the rollouts use (greedy by default)."""

from __future__ import annotations

from erpo_mega.data.batcher import PromptBatch
from erpo_mega.orchestration.rollout_step import generate_rollout


def evaluate(client, items, prompt_ids, tokenizer, reward_fn, *, run_seed: int, step: int, max_new_tokens: int,
             temperature: float = 0.0, concurrency: int = 8) -> dict[str, float]:
    """Accuracy (reward == 1), mean reward and response length on `items` (one sample each)."""
    batch = PromptBatch(items=list(items), indices=list(range(len(items))), group_size=1, step=step, epoch=0)
    ro = generate_rollout(client, batch, prompt_ids, tokenizer, reward_fn, run_seed=run_seed, step=step,
                          max_new_tokens=max_new_tokens, temperature=max(temperature, 0.0), salt="eval",
                          concurrency=concurrency)
    n = len(ro)
    return {
        "accuracy": sum(r >= 1.0 for r in ro.rewards) / n,
        "reward_mean": sum(ro.rewards) / n,
        "response_len_mean": sum(len(r) for r in ro.response_ids) / n,
        "truncated_fraction": sum(ro.truncated) / n,
        "num_prompts": float(n),
    }
