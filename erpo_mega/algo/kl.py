"""Per-token KL estimators from log-probabilities of the sampled tokens (Schulman's k1/k2/k3).

For a token x drawn from the policy and log-ratio d = log q(x) - log p(x) (q the reference),
estimating KL(p || q) = E_p[-d]:
    k1 = -d                 unbiased, high variance, can be negative
    k2 = d^2 / 2            biased, low variance, >= 0
    k3 = exp(d) - 1 - d     unbiased, low variance, >= 0
"""

from __future__ import annotations

import torch

from erpo_mega.algo.config import KL_ESTIMATORS


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi; differentiable w.r.t. `logp`."""
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.expm1(d) - d
    raise ValueError(f"kl_estimator: must be one of {list(KL_ESTIMATORS)}, got {estimator!r}")
