"""Per-token KL estimators from log-probabilities of the sampled tokens (Schulman's k1/k2/k3).

For a token x drawn from the policy and log-ratio d = log q(x) - log p(x) (q the reference),
estimating KL(p || q) = E_p[-d]:
    k1 = -d                 unbiased, high variance, can be negative
    k2 = d^2 / 2            biased, low variance, >= 0
    k3 = exp(d) - 1 - d     unbiased, low variance, >= 0

k3 exponentiates: one token the policy has pushed far from the reference (d = +100) would
give inf and poison the whole step. As in verl's and slime's losses, d is clamped to
[-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP] before exp and the k3 value to [-K3_VALUE_CLAMP,
K3_VALUE_CLAMP]; such tokens then carry no KL gradient (the clamp is flat), which is the
behaviour those anchors have and far better than a NaN.
"""

from __future__ import annotations

import torch

from erpo_mega.algo.config import KL_ESTIMATORS

KL_LOG_RATIO_CLAMP = 20.0
K3_VALUE_CLAMP = 10.0


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi; differentiable w.r.t. `logp`."""
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        d = d.clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
        return (torch.expm1(d) - d).clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP)
    raise ValueError(f"kl_estimator: must be one of {list(KL_ESTIMATORS)}, got {estimator!r}")
