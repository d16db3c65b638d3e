"""Registries: built-ins by name, user plug-ins by decorator or by 'module:function' string."""

import pytest
import torch

from erpo_mega.algo import (
    ERPOConfig,
    LossConfig,
    LossNormalizer,
    erpo_token_advantages,
    get_advantage_estimator,
    get_policy_loss,
    grpo_advantages,
    policy_loss,
    register_advantage_estimator,
    register_policy_loss,
)
from erpo_mega.algo.registry import ADVANTAGE_ESTIMATORS, POLICY_LOSSES


@pytest.fixture
def batch():
    torch.manual_seed(1)
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    h = torch.rand(6, 5)
    mask = torch.arange(5)[None] < torch.tensor([5, 3, 4, 1, 5, 2])[:, None]
    return r, h, mask, g


def test_builtin_estimators_share_one_signature(batch):
    r, h, mask, g = batch
    cfg = ERPOConfig()
    erpo, stats = get_advantage_estimator("erpo")(r, h, mask, g, cfg)
    assert torch.equal(erpo, erpo_token_advantages(r, h, mask, g, cfg)[0])
    assert "cdp_fraction" in stats and len(stats["cdp_bucket_hist"]) == cfg.num_buckets
    grpo, gstats = get_advantage_estimator("grpo")(r, h, mask, g, cfg)
    assert torch.equal(grpo, torch.where(mask, grpo_advantages(r, g)[:, None], 0.0))
    assert "cdp_fraction" in gstats  # GRPO runs report the same pivot statistics
    dr, _ = get_advantage_estimator("dr_grpo")(r, None, mask, g, cfg)  # entropy is optional for GRPO
    # Dr.GRPO: r - mean(r) = +-1/3, +-2/3 with no std scaling
    assert dr[:, 0].tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -2 / 3])


def test_builtin_loss():
    assert get_policy_loss("ppo_clip") is policy_loss


def test_user_estimator_and_loss_by_decorator(batch):
    r, h, mask, g = batch

    @register_advantage_estimator("test_constant")
    def constant(rewards, entropy, response_mask, group_ids, cfg):
        return response_mask.float() * cfg.beta, {}

    @register_policy_loss("test_sum")
    def summed(logp, old_logp, advantages, mask, cfg, *, normalizer, **_):
        return (logp * mask).sum(), {}

    try:
        adv, _ = get_advantage_estimator("test_constant")(r, h, mask, g, ERPOConfig(beta=0.25))
        assert adv.sum().item() == pytest.approx(0.25 * mask.sum().item())
        loss, _ = get_policy_loss("test_sum")(torch.ones(2, 2), None, None, torch.ones(2, 2), LossConfig(),
                                              normalizer=LossNormalizer(4, 2))
        assert loss.item() == 4.0
        with pytest.raises(ValueError, match="already registered"):
            register_advantage_estimator("test_constant")(lambda *a: None)
        register_advantage_estimator("test_constant", overwrite=True)(constant)  # explicit replacement is fine
    finally:
        ADVANTAGE_ESTIMATORS._items.pop("test_constant", None)
        POLICY_LOSSES._items.pop("test_sum", None)


def test_module_path_strings():
    fn = get_advantage_estimator("erpo_mega.algo.advantages:erpo_estimator")
    assert fn is get_advantage_estimator("erpo")
    assert get_policy_loss("erpo_mega.algo.loss:policy_loss") is policy_loss


@pytest.mark.parametrize("name,pattern", [
    ("nope", r"unknown advantage estimator 'nope'; registered: .*dr_grpo, erpo, grpo"),
    ("no_such_module_xyz:fn", r"cannot import module 'no_such_module_xyz'"),
    ("erpo_mega.algo.advantages:missing", r"has no attribute 'missing'"),
    ("erpo_mega.algo.advantages:_F64", r"'_F64' is not callable"),
    (":fn", r"expected 'package.module:function'"),
    ("", r"non-empty string"),
])
def test_bad_names(name, pattern):
    with pytest.raises(ValueError, match=pattern):
        get_advantage_estimator(name)


def test_bad_registration_names():
    with pytest.raises(ValueError, match="without ':'"):
        register_policy_loss("a:b")
