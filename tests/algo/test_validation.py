"""Bad inputs fail fast with a ValueError that names the argument or config key."""

import pytest
import torch

from erpo_mega.algo import (
    ERPOConfig,
    LossConfig,
    LossNormalizer,
    erpo_token_advantages,
    grpo_advantages,
    policy_loss,
)
from erpo_mega.config import ConfigError


def good():
    return {
        "rewards": torch.tensor([1.0, 0.0, 0.5, 0.5]),
        "entropy": torch.rand(4, 5),
        "response_mask": torch.ones(4, 5, dtype=torch.bool),
        "group_ids": torch.tensor([0, 0, 1, 1]),
    }


def call(**changes):
    args = good()
    args.update(changes)
    return erpo_token_advantages(args["rewards"], args["entropy"], args["response_mask"], args["group_ids"],
                                 ERPOConfig())


def test_good_inputs_pass():
    adv, _ = call()
    assert adv.shape == (4, 5)


def _nan_at(t, index, value=float("nan")):
    t = t.clone()
    t[index] = value
    return t


def _row_empty():
    m = torch.ones(4, 5, dtype=torch.bool)
    m[2] = False
    return m


@pytest.mark.parametrize("changes,pattern", [
    ({"rewards": torch.tensor([1.0, 0.0, 0.5])}, r"group_ids: has 4 entries but rewards has 3"),
    ({"rewards": torch.tensor([[1.0, 0.0, 0.5, 0.5]])}, r"rewards: expected 1 dimension"),
    ({"rewards": torch.tensor([1, 0, 1, 1])}, r"rewards: expected a floating-point tensor"),
    ({"rewards": [1.0, 0.0, 0.5, 0.5]}, r"rewards: expected a torch.Tensor"),
    ({"rewards": torch.tensor([1.0, float("nan"), 0.5, 0.5])}, r"rewards: non-finite value nan at index \(1,\)"),
    ({"rewards": torch.tensor([1.0, 0.0, float("inf"), 0.5])}, r"rewards: non-finite value inf"),
    ({"entropy": torch.rand(4, 6)}, r"entropy: shape \(4, 6\) does not match response_mask \(4, 5\)"),
    ({"entropy": torch.rand(4, 5).half().to(torch.int32)}, r"entropy: expected a floating-point tensor"),
    ({"entropy": _nan_at(torch.rand(4, 5), (3, 1))}, r"entropy: non-finite value nan at index \(3, 1\) \(inside"),
    ({"entropy": _nan_at(torch.rand(4, 5), (0, 0), float("-inf"))}, r"entropy: non-finite value -inf"),
    ({"response_mask": torch.ones(3, 5)}, r"response_mask: has 3 rows but rewards has 4"),
    ({"response_mask": torch.full((4, 5), 2.0)}, r"response_mask: must contain only 0 and 1"),
    ({"response_mask": _row_empty()}, r"response_mask: row 2 is all zero \(an empty response\)"),
    ({"group_ids": torch.tensor([0, 0, 1, 2])}, r"group_ids: group 1 has a single response"),
    ({"group_ids": torch.tensor([0.0, 0.0, 1.0, 1.0])}, r"group_ids: expected an integer tensor"),
    ({"group_ids": torch.tensor([0, 0, 1])}, r"group_ids: has 3 entries but rewards has 4"),
    ({"entropy": None}, r"entropy: is required"),
])
def test_bad_estimator_inputs(changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(**changes)


def test_nan_entropy_outside_mask_is_fine():
    m = torch.ones(4, 5, dtype=torch.bool)
    m[:, 4] = False
    adv, _ = call(entropy=_nan_at(torch.rand(4, 5), (1, 4)), response_mask=m)
    assert torch.isfinite(adv).all()


def test_grpo_rejects_lonely_groups_and_bad_rewards():
    with pytest.raises(ValueError, match="group_ids: group 7 has a single response"):
        grpo_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([3, 3, 7]))
    with pytest.raises(ValueError, match="rewards: is empty"):
        grpo_advantages(torch.tensor([]), torch.tensor([], dtype=torch.long))


def test_wrong_config_type():
    a = good()
    with pytest.raises(ValueError, match="cfg: expected ERPOConfig"):
        erpo_token_advantages(a["rewards"], a["entropy"], a["response_mask"], a["group_ids"], {"beta": 1.0})


@pytest.mark.parametrize("data,key", [
    ({"gama": 2.0}, "gama"),
    ({"gamma": 0.0}, "gamma"),
    ({"num_buckets": 0}, "num_buckets"),
    ({"num_buckets": 2.5}, "num_buckets"),
    ({"beta": -0.1}, "beta"),
    ({"anchor": "both"}, "anchor"),
    ({"eps": 0}, "eps"),
    ({"gating": "yes"}, "gating"),
])
def test_erpo_config_errors_name_the_key(data, key):
    with pytest.raises(ConfigError, match=rf"config key 'algo\.{key}' \(in run\.yaml\)"):
        ERPOConfig.from_dict(data, source="run.yaml", prefix="algo")


@pytest.mark.parametrize("data,key", [
    ({"clip_eps_low": 1.0}, "clip_eps_low"),
    ({"clip_eps_high": -0.1}, "clip_eps_high"),
    ({"dual_clip_c": 1.0}, "dual_clip_c"),
    ({"kl_estimator": "k4"}, "kl_estimator"),
    ({"aggregation": "mean"}, "aggregation"),
    ({"tis_cap": 0.0}, "tis_cap"),
    ({"seq_sum_normalizer": 0}, "seq_sum_normalizer"),
    ({"kl_coeff": 0.1}, "kl_coeff"),
])
def test_loss_config_errors_name_the_key(data, key):
    with pytest.raises(ConfigError, match=rf"config key '{key}'"):
        LossConfig.from_dict(data)


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="gamma"):
        ERPOConfig(gamma=-1.0)
    with pytest.raises(ConfigError, match="aggregation"):
        LossConfig(aggregation="sum")
    assert LossConfig.from_dict({"dual_clip_c": 3, "tis_cap": None}).dual_clip_c == 3.0


def _loss_args():
    mask = torch.ones(2, 3)
    return dict(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), advantages=torch.zeros(2, 3), mask=mask,
                cfg=LossConfig(), normalizer=LossNormalizer.from_mask(mask))


@pytest.mark.parametrize("changes,pattern", [
    ({"old_logp": torch.zeros(2, 4)}, r"old_logp: shape \(2, 4\) does not match mask \(2, 3\)"),
    ({"advantages": torch.zeros(6)}, r"advantages: expected 2 dimension"),
    ({"logp": torch.zeros(2, 3, dtype=torch.long)}, r"logp: expected a floating-point tensor"),
    ({"mask": torch.full((2, 3), 3)}, r"mask: must contain only 0 and 1"),
    ({"cfg": LossConfig(kl_coef=0.1)}, r"ref_logp: is required when kl_coef > 0"),
    ({"cfg": LossConfig(entropy_coef=0.01)}, r"entropy: is required when entropy_coef != 0"),
    ({"cfg": LossConfig(tis_cap=2.0)}, r"rollout_logp: is required when tis_cap is set"),
    ({"cfg": {"clip_eps_low": 0.2}}, r"cfg: expected LossConfig"),
    ({"normalizer": 5}, r"normalizer: expected LossNormalizer"),
    ({"ref_logp": torch.zeros(3, 3)}, r"ref_logp: shape"),
])
def test_bad_loss_inputs(changes, pattern):
    args = _loss_args()
    args.update(changes)
    with pytest.raises(ValueError, match=pattern):
        policy_loss(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"), args.pop("mask"),
                    args.pop("cfg"), **args)
