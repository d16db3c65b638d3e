"""Typed knobs of the advantage estimator (ERPO.md sections 1-4) and the policy loss (section 5).

Both dataclasses validate themselves on construction (bounds and choices live next to each
field), so a config built in code is held to the same rules as one read from YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from erpo_mega.config import bounds, choices, from_dict, validate

ANCHORS = ("redistribute", "additive")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


@dataclass
class ERPOConfig:
    """ERPO token-advantage settings; every component can be switched off for ablations."""

    gamma: float = field(default=1.0, metadata=bounds(gt=0))  # gate sharpness: W = sigmoid(gamma * z)
    tau: float = 1.0  # CDP threshold on the group entropy z-score (metrics only)
    num_buckets: int = field(default=8, metadata=bounds(ge=1))  # progress buckets K
    beta: float = field(default=0.5, metadata=bounds(ge=0))  # token-signal strength; 0 is GRPO
    anchor: str = field(default="redistribute", metadata=choices(*ANCHORS))
    gating: bool = True  # False: W = 1
    buckets: bool = True  # False: s = z
    scale_by_std: bool = True  # False: Dr.GRPO outcome advantage r - mean(r)
    eps: float = field(default=1e-6, metadata=bounds(gt=0))

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def from_dict(cls, data: dict | None, source: str | None = None, prefix: str = "") -> ERPOConfig:
        return from_dict(cls, data, source=source, prefix=prefix)


@dataclass
class LossConfig:
    """Clipped-surrogate policy loss settings (ERPO.md section 5)."""

    clip_eps_low: float = field(default=0.2, metadata=bounds(ge=0, lt=1))
    clip_eps_high: float = field(default=0.28, metadata=bounds(ge=0))  # > clip_eps_low is "clip-higher"
    dual_clip_c: float | None = field(default=None, metadata=bounds(gt=1))  # cap on the loss of A<0 tokens
    kl_coef: float = field(default=0.0, metadata=bounds(ge=0))
    kl_estimator: str = field(default="k3", metadata=choices(*KL_ESTIMATORS))
    entropy_coef: float = 0.0  # loss -= entropy_coef * H (a negative value penalises entropy)
    tis_cap: float | None = field(default=None, metadata=bounds(gt=0))  # min(pi_old / pi_rollout, cap)
    aggregation: str = field(default="token-mean", metadata=choices(*AGGREGATIONS))
    seq_sum_normalizer: float | None = field(default=None, metadata=bounds(gt=0))  # Dr.GRPO constant divisor

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def from_dict(cls, data: dict | None, source: str | None = None, prefix: str = "") -> LossConfig:
        return from_dict(cls, data, source=source, prefix=prefix)
