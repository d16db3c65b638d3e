"""Pure RL algorithm layer: GRPO/ERPO advantages, the clipped policy loss, KL estimators, registries.

Torch only, no torch.distributed: callers pass whole prompt groups to the estimators and
global normalisers to the loss, which makes the results independent of the parallel layout.
"""

from erpo_mega.algo.advantages import (
    ERPOTerms,
    cdp_statistics,
    erpo_terms,
    erpo_token_advantages,
    grpo_advantages,
)
from erpo_mega.algo.config import ERPOConfig, LossConfig
from erpo_mega.algo.kl import kl_estimate
from erpo_mega.algo.loss import LossNormalizer, combine_metrics, policy_loss
from erpo_mega.algo.registry import (
    get_advantage_estimator,
    get_policy_loss,
    register_advantage_estimator,
    register_policy_loss,
)
from erpo_mega.algo.sft import sft_nll_loss

__all__ = [
    "ERPOConfig",
    "ERPOTerms",
    "LossConfig",
    "LossNormalizer",
    "cdp_statistics",
    "combine_metrics",
    "erpo_terms",
    "erpo_token_advantages",
    "get_advantage_estimator",
    "get_policy_loss",
    "grpo_advantages",
    "kl_estimate",
    "policy_loss",
    "register_advantage_estimator",
    "register_policy_loss",
    "sft_nll_loss",
]
