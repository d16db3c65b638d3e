"""Clipped-surrogate policy loss with global normalisers (ERPO.md section 5).

The loss of a step is a normalised sum over every token of every micro-batch on every
data-parallel rank. Each call here returns one micro-batch's *contribution*: it divides by
the step's global token/sequence counts (`LossNormalizer`), never by local ones, so the sum
of the contributions is exactly the whole-batch loss whatever the micro-batch size or DP
degree. The same holds for the metrics: each is a 0-dim tensor whose sum over
micro-batches and ranks is the whole-step value (keys ending in `_max` combine by max
instead; `combine_metrics` does both).

Aggregation modes (l[i, t] the per-token loss, m the mask, T_i = sum_t m[i, t]):
    token-mean:           sum_{i,t} m l / num_tokens
    seq-mean-token-mean:  sum_i (sum_t m l / T_i) / num_seqs
    seq-mean-token-sum:   sum_i (sum_t m l) / (num_seqs * (seq_sum_normalizer or 1))
Per-sequence modes need each sequence whole inside one micro-batch (rows are sequences).
Diagnostic metrics (clip fractions, KLs, entropy, TIS) are token means over the step.

Every log-ratio is clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] before `exp` (as verl and
slime do): exp(+100) is inf in fp32, and inf * a zero advantage is NaN, which would turn the
whole step's loss into NaN because of one token. Nothing changes for |log-ratio| <= 20 (a
ratio of 5e8, far outside any clip range); beyond it the token's ratio is held at e^20 and
carries no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erpo_mega.algo.config import LossConfig
from erpo_mega.algo.kl import kl_estimate
from erpo_mega.algo.registry import register_policy_loss
from erpo_mega.algo.validation import check_tensor

LOG_RATIO_CLAMP = 20.0


def _safe_exp(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp(d) - 1 - d with d clamped, for metrics (finite for any input)."""
    d = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.expm1(d) - d


@dataclass(frozen=True)
class LossNormalizer:
    """Global counts for one optimizer step, taken over all micro-batches and DP ranks.

    Counts are taken from the response mask before anything is gated out, so a token whose
    advantage is zero still counts (as in GRPO: it dilutes, it does not vanish).
    `num_seqs` counts sequences with at least one response token.
    """

    num_tokens: float
    num_seqs: float

    def __post_init__(self) -> None:
        for name in ("num_tokens", "num_seqs"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                value = value.item()
                object.__setattr__(self, name, value)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"LossNormalizer.{name}: must be a positive number, got {value!r}")

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> LossNormalizer:
        """Counts of a single batch (no micro-batching, no data parallelism)."""
        m = mask.bool()
        return cls(num_tokens=float(m.sum()), num_seqs=float(m.any(dim=1).sum()))


def _check_inputs(logp, old_logp, advantages, mask, cfg, normalizer, ref_logp, rollout_logp, entropy):
    if not isinstance(cfg, LossConfig):
        raise ValueError(f"cfg: expected LossConfig, got {type(cfg).__name__}")
    if not isinstance(normalizer, LossNormalizer):
        raise ValueError(f"normalizer: expected LossNormalizer, got {type(normalizer).__name__}")
    check_tensor(mask, "mask", ndim=2, kind="mask")
    named = {"logp": logp, "old_logp": old_logp, "advantages": advantages, "ref_logp": ref_logp,
             "rollout_logp": rollout_logp, "entropy": entropy}
    for name, t in named.items():
        if t is None:
            continue
        check_tensor(t, name, ndim=2, kind="float")
        if t.shape != mask.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match mask {tuple(mask.shape)}")
        if t.device != mask.device:
            raise ValueError(f"{name}: is on {t.device} but mask is on {mask.device}")
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError("ref_logp: is required when kl_coef > 0")
    if cfg.entropy_coef != 0 and entropy is None:
        raise ValueError("entropy: is required when entropy_coef != 0")
    if cfg.tis_cap is not None and rollout_logp is None:
        raise ValueError("rollout_logp: is required when tis_cap is set")


def _aggregate(per_token: torch.Tensor, m: torch.Tensor, cfg: LossConfig, normalizer: LossNormalizer
               ) -> torch.Tensor:
    masked = per_token * m
    if cfg.aggregation == "token-mean":
        return masked.sum() / normalizer.num_tokens
    seq_sum = masked.sum(dim=1)
    if cfg.aggregation == "seq-mean-token-mean":
        return (seq_sum / m.sum(dim=1).clamp(min=1)).sum() / normalizer.num_seqs
    divisor = normalizer.num_seqs * (cfg.seq_sum_normalizer or 1.0)
    return seq_sum.sum() / divisor


def _token_mean(x: torch.Tensor, m: torch.Tensor, normalizer: LossNormalizer) -> torch.Tensor:
    return (x * m).sum().detach() / normalizer.num_tokens


@register_policy_loss("ppo_clip")
def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cfg: LossConfig, *, normalizer: LossNormalizer, ref_logp: torch.Tensor | None = None,
                rollout_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's contribution to the step loss, and its additive metrics.

    Per token: ratio = exp(logp - old_logp);
        pg = max(-ratio A, -clip(ratio, 1 - eps_low, 1 + eps_high) A)
        dual clip (A < 0): pg = min(pg, -c A)
        TIS: pg *= min(exp(old_logp - rollout_logp), tis_cap)      (a constant weight)
        l = pg + kl_coef * KL_est(logp, ref_logp) - entropy_coef * entropy
    Gradients flow through `logp` (and `entropy`); old/ref/rollout log-probs and advantages
    are constants. Values at masked-out positions never reach the result, even if NaN/inf.
    """
    _check_inputs(logp, old_logp, advantages, mask, cfg, normalizer, ref_logp, rollout_logp, entropy)
    m_bool = mask.bool()
    m = m_bool.to(logp.dtype)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)

    def clean(t):  # keep padding garbage out of exp() and of gradients
        return torch.where(m_bool, t, zero)

    logp = clean(logp)
    old_logp = clean(old_logp.detach())
    ref_logp = clean(ref_logp.detach()) if ref_logp is not None else None
    rollout_logp = clean(rollout_logp.detach()) if rollout_logp is not None else None
    entropy = clean(entropy) if entropy is not None else None
    adv = clean(advantages.detach().to(logp.dtype))
    log_ratio = logp - old_logp
    ratio = _safe_exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    pg = torch.maximum(-ratio * adv, -clipped_ratio * adv)
    metrics: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        clip_high = (ratio > 1.0 + cfg.clip_eps_high) & (adv > 0)
        clip_low = (ratio < 1.0 - cfg.clip_eps_low) & (adv < 0)
        metrics["clip_frac_high"] = _token_mean(clip_high.to(m.dtype), m, normalizer)
        metrics["clip_frac_low"] = _token_mean(clip_low.to(m.dtype), m, normalizer)
    dual_hit = torch.zeros_like(m_bool)
    if cfg.dual_clip_c is not None:
        cap = -cfg.dual_clip_c * adv
        dual_hit = (adv < 0) & (pg > cap)
        pg = torch.where(dual_hit, cap, pg)
    metrics["dual_clip_frac"] = _token_mean(dual_hit.to(m.dtype), m, normalizer)

    with torch.no_grad():
        metrics["ratio_mean"] = _token_mean(ratio, m, normalizer)
        # KL(pi_old || pi) from tokens sampled by pi_old: k3 with r = pi / pi_old.
        metrics["approx_kl"] = _token_mean(_k3(log_ratio.detach()), m, normalizer)

    if rollout_logp is not None:
        with torch.no_grad():
            old_vs_rollout = old_logp - rollout_logp
            gap = old_vs_rollout.abs() * m
            metrics["rollout_logp_abs_diff_mean"] = gap.sum() / normalizer.num_tokens
            metrics["rollout_logp_abs_diff_max"] = gap.max() if gap.numel() else zero.clone()
            # KL(pi_rollout || pi_old) from tokens sampled by the rollout engine (k3).
            metrics["rollout_kl"] = _token_mean(_k3(old_vs_rollout), m, normalizer)
            if cfg.tis_cap is not None:
                raw = _safe_exp(old_vs_rollout)
                weight = raw.clamp(max=cfg.tis_cap)
                metrics["tis_weight_mean"] = _token_mean(weight, m, normalizer)
                metrics["tis_clip_frac"] = _token_mean((raw > cfg.tis_cap).to(m.dtype), m, normalizer)
        if cfg.tis_cap is not None:
            pg = pg * weight

    per_token = pg
    pg_loss = _aggregate(pg, m, cfg, normalizer)
    metrics["pg_loss"] = pg_loss.detach()
    if ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, cfg.kl_estimator)
        metrics["kl"] = _token_mean(kl, m, normalizer)
        if cfg.kl_coef > 0:
            per_token = per_token + cfg.kl_coef * kl
            metrics["kl_loss"] = _aggregate(cfg.kl_coef * kl.detach(), m, cfg, normalizer)
    if entropy is not None:
        ent = entropy
        metrics["entropy"] = _token_mean(ent, m, normalizer)
        if cfg.entropy_coef != 0:
            per_token = per_token - cfg.entropy_coef * ent
            metrics["entropy_loss"] = -_aggregate(cfg.entropy_coef * ent.detach(), m, cfg, normalizer)
    loss = _aggregate(per_token, m, cfg, normalizer)
    metrics["loss"] = loss.detach()
    return loss, metrics


def combine_metrics(contributions: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Whole-step metrics from per-micro-batch contributions: sum, or max for keys ending in `_max`.

    Across data-parallel ranks use all_reduce(SUM) / all_reduce(MAX) with the same rule.
    """
    out: dict[str, torch.Tensor] = {}
    for metrics in contributions:
        for key, value in metrics.items():
            if key not in out:
                out[key] = value.detach().clone()
            elif key.endswith("_max"):
                out[key] = torch.maximum(out[key], value.detach())
            else:
                out[key] = out[key] + value.detach()
    return out
