"""The SFT loss: hand-computed NLL, registry lookup, micro-batch additivity."""

import math

import pytest
import torch

from erpo_mega.algo import LossConfig, LossNormalizer, get_policy_loss, sft_nll_loss


def test_hand_computed_token_mean_nll():
    # probabilities 0.5, 0.25 | 0.1 (second row has one real token)
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.1, 0.9]]))
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, metrics = sft_nll_loss(logp, torch.zeros(2, 2), torch.zeros(2, 2), mask, LossConfig(),
                                 normalizer=LossNormalizer.from_mask(mask))
    expected = (math.log(2) + math.log(4) + math.log(10)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["nll"].item() == pytest.approx(expected, rel=1e-6)


def test_gradient_is_minus_one_over_n_per_token():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.3]])).requires_grad_()
    mask = torch.tensor([[1, 1, 0]])
    loss, _ = sft_nll_loss(logp, logp.detach(), logp.detach(), mask, LossConfig(),
                           normalizer=LossNormalizer.from_mask(mask))
    loss.backward()
    assert logp.grad.tolist() == [[-0.5, -0.5, 0.0]]


def test_registered_and_additive_over_micro_batches():
    assert get_policy_loss("sft_nll") is sft_nll_loss
    torch.manual_seed(0)
    logp = -torch.rand(6, 5)
    mask = (torch.rand(6, 5) > 0.3).int()
    mask[:, 0] = 1
    norm = LossNormalizer.from_mask(mask)
    whole, _ = sft_nll_loss(logp, logp, logp, mask, LossConfig(), normalizer=norm)
    parts = sum(sft_nll_loss(logp[i:i + 2], logp, logp, mask[i:i + 2], LossConfig(), normalizer=norm)[0]
                for i in range(0, 6, 2))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)
