"""Extreme log-ratios stay finite (issue 14): clamps as in verl's and slime's losses.

Each case gave NaN or inf before the clamps; the expected values are computed by hand.
"""

import math

import pytest
import torch

from erpo_mega.algo import LossConfig, LossNormalizer, kl_estimate, policy_loss


def _one(logp, old, adv, cfg, **extra):
    mask = torch.ones(1, len(logp))
    lp = torch.tensor([logp]).requires_grad_(True)
    loss, m = policy_loss(lp, torch.tensor([old]), torch.tensor([adv]), mask, cfg,
                          normalizer=LossNormalizer.from_mask(mask), **extra)
    loss.backward()
    return loss, lp.grad, m


def test_huge_log_ratio_on_zero_advantage_token_is_finite():
    # token 0: log-ratio +100 with A = 0 (exp(100) = inf in fp32, inf * 0 = NaN before);
    # token 1: ordinary, ratio 1, A = 1 -> per-token loss -1; token-mean over 2 tokens.
    loss, grad, m = _one([0.0, -1.0], [-100.0, -1.0], [0.0, 1.0], LossConfig())
    assert math.isfinite(loss.item()) and loss.item() == -0.5
    assert torch.isfinite(grad).all()
    assert grad[0, 0].item() == 0.0 and grad[0, 1].item() == -0.5
    assert math.isfinite(m["approx_kl"].item()) and math.isfinite(m["ratio_mean"].item())


def test_huge_log_ratio_with_negative_advantage_is_capped_not_inf():
    loss, grad, _ = _one([0.0], [-100.0], [-1.0], LossConfig())
    assert loss.item() == pytest.approx(math.exp(20.0), rel=1e-6)  # -ratio * A, ratio held at e^20
    assert grad.item() == 0.0


def test_k3_kl_argument_and_value_are_clamped():
    logp = torch.tensor([[-100.0, 0.0, -1.0]])
    ref = torch.tensor([[0.0, -100.0, -1.5]])
    kl = kl_estimate(logp, ref, "k3")
    # d = ref - logp = +100 -> exp(20) - 1 - 20 clamped to 10; d = -100 -> exp(-20) - 1 + 20 ~ 19 -> 10;
    # d = -0.5 -> exp(-0.5) - 1 + 0.5 (inside both clamps, unchanged)
    assert kl[0, 0].item() == 10.0 and kl[0, 1].item() == 10.0
    assert abs(kl[0, 2].item() - (math.exp(-0.5) - 0.5)) < 1e-6


def test_kl_loss_and_rollout_metrics_finite_with_extreme_gaps():
    cfg = LossConfig(kl_coef=0.1, tis_cap=2.0)
    loss, grad, m = _one([0.0, -1.0], [0.0, -1.0], [1.0, 1.0], cfg, ref_logp=torch.tensor([[-200.0, -1.0]]),
                         rollout_logp=torch.tensor([[-300.0, -1.0]]))
    assert math.isfinite(loss.item()) and torch.isfinite(grad).all()
    for k in ("kl", "rollout_kl", "tis_weight_mean", "rollout_logp_abs_diff_mean"):
        assert math.isfinite(m[k].item()), k
    assert m["kl"].item() == (10.0 + 0.0) / 2  # the k3 value clamp on token 0
