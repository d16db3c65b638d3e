"""User plug-ins the e2e tests select by name from YAML (the registry's "module:function" path)."""

import torch

from erpo_mega.algo.advantages import erpo_estimator

_calls = {"n": 0}


def nan_on_second_step(rewards, entropy, response_mask, group_ids, cfg):
    """ERPO advantages, except that the second call returns NaN: a diverging run to stop."""
    _calls["n"] += 1
    adv, stats = erpo_estimator(rewards, entropy, response_mask, group_ids, cfg)
    if _calls["n"] >= 2:
        adv = torch.full_like(adv, float("nan"))
    return adv, stats


def even_length_reward(item, response: str) -> float:
    """1 for an even number of characters: a reward an untrained model earns about half the
    time, so every group has non-zero advantages and the policy must move."""
    return float(len(response) % 2 == 0)
