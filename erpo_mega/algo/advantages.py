"""Group-relative advantages: GRPO (sequence level) and ERPO (token level), as ERPO.md defines them.

Conventions fixed here (documented once, used everywhere):
- every std is the population std (divide by n, `torch.std(unbiased=False)`): the outcome
  std over a group's G rewards, the group entropy std, the bucket stds and the std of u;
- a group whose rewards are all exactly equal gets A = 0 (tested for exact equality, so
  rounding in the mean cannot turn 0.1, 0.1, 0.1 into tiny nonzero advantages with a sign);
  likewise z = 0 in a group, and s = 0 in a bucket, whose entropies are all equal (this
  covers ERPO.md's "a bucket with one token, or zero spread, gives s = 0");
- statistics are computed in float64 on the flat list of masked tokens; results come back
  as float64 if rewards or entropy are float64, else float32; padding is exactly 0.

Group ids are arbitrary integers; a group's responses need not be contiguous. Every
statistic depends only on the tokens of one prompt group, so calling this once on the whole
rollout batch (before splitting it across ranks and micro-batches) makes the result
independent of any parallel layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erpo_mega.algo.config import ERPOConfig
from erpo_mega.algo.registry import register_advantage_estimator
from erpo_mega.algo.segments import (
    dense_index,
    segment_all_equal,
    segment_mean_std,
    segment_sum,
    segment_zscore,
)
from erpo_mega.algo.validation import check_group_inputs

_F64 = torch.float64


def _out_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return _F64 if any(t is not None and t.dtype == _F64 for t in tensors) else torch.float32


def _outcome_advantage(rewards: torch.Tensor, group: torch.Tensor, num_groups: int, scale_by_std: bool,
                       eps: float) -> torch.Tensor:
    r = rewards.to(_F64)
    mean, std, _ = segment_mean_std(r, group, num_groups)
    adv = r - mean[group]
    if scale_by_std:
        adv = adv / (std[group] + eps)
    flat = segment_all_equal(r, group, num_groups)
    return torch.where(flat[group], torch.zeros_like(adv), adv)


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, scale_by_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """Sequence-level GRPO advantage [N]: (r - mean_G r) / (std_G r + eps), or r - mean_G r (Dr.GRPO)."""
    check_group_inputs(rewards, None, None, group_ids, need_entropy=False)
    group, num_groups = dense_index(group_ids)
    adv = _outcome_advantage(rewards, group, num_groups, scale_by_std, eps)
    return adv.to(_out_dtype(rewards))


@dataclass
class ERPOTerms:
    """Every intermediate of ERPO.md sections 1-4, dense [N, T] with 0 on padding (bucket: -1).

    Exposed so tests, ablation plots and the toy example can look inside the estimator.
    """

    outcome: torch.Tensor  # A [N]
    z: torch.Tensor  # group entropy z-score
    gate: torch.Tensor  # W
    bucket: torch.Tensor  # progress bucket b (long)
    bucket_score: torch.Tensor  # s
    salience: torch.Tensor  # u_hat
    pre_clamp: torch.Tensor  # A_tok before the sign clamp
    advantages: torch.Tensor  # A_tok after the clamp
    cdp: torch.Tensor  # bool, z > tau on masked tokens
    mask: torch.Tensor  # bool


def _progress_bucket(mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, k_buckets: int) -> torch.Tensor:
    """b = min(K-1, floor(K (k + 0.5) / T_i)) in exact integer arithmetic: floor(K (2k+1) / (2 T_i))."""
    lengths = mask.sum(dim=1)
    k = (mask.cumsum(dim=1) - 1)[rows, cols]
    b = torch.div(k_buckets * (2 * k + 1), 2 * lengths[rows], rounding_mode="floor")
    return b.clamp(max=k_buckets - 1)


def _dense(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape, dtype, fill=0) -> torch.Tensor:
    out = torch.full(shape, fill, dtype=dtype, device=values.device)
    out[rows, cols] = values.to(dtype)
    return out


def erpo_terms(rewards: torch.Tensor, entropy: torch.Tensor, response_mask: torch.Tensor,
               group_ids: torch.Tensor, cfg: ERPOConfig) -> ERPOTerms:
    """Compute ERPO token advantages and all intermediates (ERPO.md sections 1-4)."""
    if not isinstance(cfg, ERPOConfig):
        raise ValueError(f"cfg: expected ERPOConfig, got {type(cfg).__name__}")
    mask = check_group_inputs(rewards, entropy, response_mask, group_ids, need_entropy=True)
    group, num_groups = dense_index(group_ids)
    eps = cfg.eps
    rows, cols = mask.nonzero(as_tuple=True)  # flat list of masked tokens, row-major
    tok_group = group[rows]
    h = entropy[rows, cols].to(_F64)

    # 1. outcome advantage
    adv = _outcome_advantage(rewards, group, num_groups, cfg.scale_by_std, eps)
    # 2. gating on the group entropy z-score
    z = segment_zscore(h, tok_group, num_groups, eps)
    gate = torch.sigmoid(cfg.gamma * z) if cfg.gating else torch.ones_like(z)
    # 3. progress buckets
    k_b = cfg.num_buckets
    bucket = _progress_bucket(mask, rows, cols, k_b)
    if cfg.buckets:
        # one segment per (group, bucket); a bucket with a single token has zero spread -> s = 0
        score = segment_zscore(h, tok_group * k_b + bucket, num_groups * k_b, eps)
    else:
        score = z
    # 4. result-anchored synthesis
    u = gate * score
    _, sd_u, _ = segment_mean_std(u, tok_group, num_groups)
    u_hat = u / (sd_u[tok_group] + eps)
    if cfg.anchor == "redistribute":
        row_mean, _, _ = segment_mean_std(u_hat, rows, mask.shape[0])
        shaped = u_hat - row_mean[rows]
    else:
        shaped = u_hat
    sign = torch.sign(adv)[rows]
    pre = adv[rows] + cfg.beta * sign * shaped
    post = sign * torch.clamp(sign * pre, min=0)

    dtype = _out_dtype(rewards, entropy)
    shape = mask.shape

    def dense(v):
        return _dense(v, rows, cols, shape, dtype)

    return ERPOTerms(
        outcome=adv.to(dtype), z=dense(z), gate=dense(gate),
        bucket=_dense(bucket, rows, cols, shape, torch.long, fill=-1),
        bucket_score=dense(score), salience=dense(u_hat), pre_clamp=dense(pre), advantages=dense(post),
        cdp=_dense(z > cfg.tau, rows, cols, shape, torch.bool, fill=False), mask=mask,
    )


def _cdp_summary(h: torch.Tensor, cdp: torch.Tensor, bucket: torch.Tensor, num_buckets: int) -> dict:
    """Summarise flat per-token entropy, CDP flags and progress buckets of the masked tokens."""
    h = h.to(_F64)
    n_cdp = int(cdp.sum())
    hist = torch.bincount(bucket[cdp], minlength=num_buckets).to(_F64)
    return {
        "cdp_fraction": n_cdp / h.numel(),
        "cdp_count": float(n_cdp),
        "entropy_mean": float(h.mean()),
        "entropy_mean_cdp": float(h[cdp].mean()) if n_cdp else 0.0,  # 0.0 when there is no CDP
        "cdp_bucket_hist": (hist / max(n_cdp, 1)).tolist(),  # share of CDPs per progress bucket
    }


def cdp_statistics(entropy: torch.Tensor, response_mask: torch.Tensor, group_ids: torch.Tensor,
                   cfg: ERPOConfig) -> dict:
    """CDP metrics (fraction, mean entropy at CDPs, progress histogram) for any estimator.

    Shared with GRPO so runs of both algorithms report the same pivot statistics.
    """
    mask = response_mask.bool()
    group, num_groups = dense_index(group_ids)
    rows, cols = mask.nonzero(as_tuple=True)
    tok_group = group[rows]
    h = entropy[rows, cols].to(_F64)
    z = segment_zscore(h, tok_group, num_groups, cfg.eps)
    bucket = _progress_bucket(mask, rows, cols, cfg.num_buckets)
    return _cdp_summary(h, z > cfg.tau, bucket, cfg.num_buckets)


def _advantage_stats(outcome: torch.Tensor, group_ids: torch.Tensor, tok_adv: torch.Tensor,
                     mask: torch.Tensor) -> dict:
    group, num_groups = dense_index(group_ids)
    zero_groups = segment_sum((outcome != 0).to(_F64), group, num_groups) == 0
    a = tok_adv[mask].to(_F64)
    return {
        "num_groups": float(num_groups),
        "num_tokens": float(a.numel()),
        "zero_adv_group_fraction": float(zero_groups.to(_F64).mean()),
        "outcome_adv_abs_mean": float(outcome.abs().to(_F64).mean()),
        "adv_abs_mean": float(a.abs().mean()),
        "adv_token_max": float(a.max()),
        "adv_token_min": float(a.min()),
    }


def erpo_token_advantages(rewards: torch.Tensor, entropy: torch.Tensor, response_mask: torch.Tensor,
                          group_ids: torch.Tensor, cfg: ERPOConfig | None = None, *, clamp: bool = True
                          ) -> tuple[torch.Tensor, dict]:
    """ERPO per-token advantages [N, T] and stats (python floats / lists).

    `clamp=False` returns the values before the sign clamp (their masked per-response mean
    equals the GRPO advantage under anchor=redistribute).
    """
    cfg = ERPOConfig() if cfg is None else cfg
    terms = erpo_terms(rewards, entropy, response_mask, group_ids, cfg)
    adv = terms.advantages if clamp else terms.pre_clamp
    m = terms.mask
    stats = _cdp_summary(entropy[m], terms.cdp[m], terms.bucket[m], cfg.num_buckets)
    stats.update(_advantage_stats(terms.outcome, group_ids, adv, m))
    changed = (terms.pre_clamp != terms.advantages) & m
    stats["clamp_fraction"] = float(changed.sum()) / float(m.sum())
    stats["gate_mean"] = float(terms.gate[m].to(_F64).mean())
    return adv, stats


@register_advantage_estimator("erpo")
def erpo_estimator(rewards, entropy, response_mask, group_ids, cfg: ERPOConfig):
    return erpo_token_advantages(rewards, entropy, response_mask, group_ids, cfg)


def _grpo_tokens(rewards, entropy, response_mask, group_ids, cfg: ERPOConfig, scale_by_std: bool):
    if not isinstance(cfg, ERPOConfig):
        raise ValueError(f"cfg: expected ERPOConfig, got {type(cfg).__name__}")
    mask = check_group_inputs(rewards, entropy, response_mask, group_ids, need_entropy=False)
    if mask is None:
        raise ValueError("response_mask: is required to broadcast sequence advantages to tokens")
    outcome = grpo_advantages(rewards, group_ids, scale_by_std=scale_by_std, eps=cfg.eps)
    adv = torch.where(mask, outcome[:, None], torch.zeros((), dtype=outcome.dtype, device=outcome.device))
    adv = adv.to(_out_dtype(rewards, entropy))
    stats = cdp_statistics(entropy, mask, group_ids, cfg) if entropy is not None else {}
    stats.update(_advantage_stats(outcome, group_ids, adv, mask))
    return adv, stats


@register_advantage_estimator("grpo")
def grpo_estimator(rewards, entropy, response_mask, group_ids, cfg: ERPOConfig):
    """GRPO broadcast to tokens; honours cfg.scale_by_std. Reports CDP stats when entropy is given."""
    return _grpo_tokens(rewards, entropy, response_mask, group_ids, cfg, cfg.scale_by_std)


@register_advantage_estimator("dr_grpo")
def dr_grpo_estimator(rewards, entropy, response_mask, group_ids, cfg: ERPOConfig):
    """Dr.GRPO: r - mean(r), no std scaling (pair it with aggregation seq-mean-token-sum)."""
    return _grpo_tokens(rewards, entropy, response_mask, group_ids, cfg, False)
