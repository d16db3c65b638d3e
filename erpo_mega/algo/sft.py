"""Supervised (negative log-likelihood) loss with the policy-loss signature.

The SFT warm start reuses the RL train step unchanged (schedules, micro-batching, DP,
global normalisers); only the per-token loss differs, so it is a registered policy loss that
ignores `old_logp` and `advantages`.
"""

from __future__ import annotations

import torch

from erpo_mega.algo.config import LossConfig
from erpo_mega.algo.loss import LossNormalizer, _aggregate
from erpo_mega.algo.registry import register_policy_loss


@register_policy_loss("sft_nll")
def sft_nll_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 cfg: LossConfig, *, normalizer: LossNormalizer, ref_logp=None, rollout_logp=None,
                 entropy=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-log p of the target tokens, aggregated like the policy loss (`cfg.aggregation`)."""
    if logp.shape != mask.shape:
        raise ValueError(f"logp: shape {tuple(logp.shape)} does not match mask {tuple(mask.shape)}")
    m = mask.to(logp.dtype)
    loss = _aggregate(-logp, m, cfg, normalizer)
    metrics = {"loss": loss.detach(), "nll": (-logp.detach() * m).sum() / normalizer.num_tokens}
    if entropy is not None:
        metrics["entropy"] = (entropy.detach() * m).sum() / normalizer.num_tokens
    return loss, metrics
