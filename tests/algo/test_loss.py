"""Policy loss: hand-computed clip/dual-clip/KL/TIS/entropy cases and micro-batch additivity."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from erpo_mega.algo import LossConfig, LossNormalizer, combine_metrics, kl_estimate, policy_loss

T64 = torch.float64


def one_token(ratio, adv, cfg, **extra):
    """Loss and d loss / d logp for a single token with the given ratio and advantage."""
    old = torch.tensor([[math.log(0.3)]], dtype=T64)
    logp = (old + math.log(ratio)).clone().requires_grad_(True)
    mask = torch.ones(1, 1)
    loss, metrics = policy_loss(logp, old, torch.tensor([[adv]], dtype=T64), mask, cfg,
                                normalizer=LossNormalizer.from_mask(mask), **extra)
    loss.backward()
    return loss.item(), logp.grad.item(), metrics


# ratio, A, expected loss, expected grad (d/dlogp of -ratio*A is -ratio*A), which clip is active
CLIP_CASES = [
    (1.5, 1.0, -1.28, 0.0, "high"),  # A>0, ratio above 1+0.28: clipped, no gradient
    (1.1, 1.0, -1.1, -1.1, None),  # inside the trust region
    (0.5, 1.0, -0.5, -0.5, None),  # A>0, ratio below 1-0.2: min picks the unclipped, smaller term
    (0.5, -1.0, 0.8, 0.0, "low"),  # A<0, ratio below 1-0.2: clipped
    (1.5, -1.0, 1.5, 1.5, None),  # A<0, ratio above: unclipped (pessimistic), gradient flows
    (1.5, 2.0, -2.56, 0.0, "high"),
    (0.7, -0.5, 0.4, 0.0, "low"),  # -min(-0.35, -0.4) = 0.4
]


@pytest.mark.parametrize("ratio,adv,loss,grad,which", CLIP_CASES)
def test_clip_cases_by_hand(ratio, adv, loss, grad, which):
    got_loss, got_grad, m = one_token(ratio, adv, LossConfig(clip_eps_low=0.2, clip_eps_high=0.28))
    assert got_loss == pytest.approx(loss)
    assert got_grad == pytest.approx(grad, abs=1e-12)
    assert m["clip_frac_high"].item() == (1.0 if which == "high" else 0.0)
    assert m["clip_frac_low"].item() == (1.0 if which == "low" else 0.0)


@pytest.mark.parametrize("ratio,adv,loss,grad,hit", [
    (4.0, -1.0, 3.0, 0.0, True),  # A<0 and ratio 4 > c=3: loss capped at c*|A|
    (2.0, -1.0, 2.0, 2.0, False),  # below the cap: ordinary pessimistic term
    (4.0, 1.0, -1.28, 0.0, False),  # dual clip never touches A>0
    (5.0, -0.5, 1.5, 0.0, True),
])
def test_dual_clip_by_hand(ratio, adv, loss, grad, hit):
    got_loss, got_grad, m = one_token(ratio, adv, LossConfig(dual_clip_c=3.0))
    assert got_loss == pytest.approx(loss)
    assert got_grad == pytest.approx(grad, abs=1e-12)
    assert m["dual_clip_frac"].item() == (1.0 if hit else 0.0)


def test_approx_kl_and_ratio_metrics():
    _, _, m = one_token(1.5, 0.0, LossConfig())
    assert m["ratio_mean"].item() == pytest.approx(1.5)
    assert m["approx_kl"].item() == pytest.approx(0.5 - math.log(1.5))  # (r - 1) - log r


@pytest.mark.parametrize("estimator,value,grad", [
    # pi(x) = 0.5, ref(x) = 0.25: d = log(ref/pi) = -log 2
    ("k1", math.log(2), 1.0),  # logp - ref_logp
    ("k2", 0.5 * math.log(2) ** 2, math.log(2)),  # (logp - ref_logp)^2 / 2
    ("k3", 0.5 - 1 + math.log(2), 1 - 0.5),  # ref/pi - 1 - log(ref/pi); grad 1 - ref/pi
])
def test_kl_estimators_by_hand(estimator, value, grad):
    logp = torch.tensor([[math.log(0.5)]], dtype=T64, requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]], dtype=T64)
    mask = torch.ones(1, 1)
    cfg = LossConfig(kl_coef=0.1, kl_estimator=estimator)
    loss, m = policy_loss(logp, logp.detach(), torch.zeros(1, 1, dtype=T64), mask, cfg,
                          normalizer=LossNormalizer.from_mask(mask), ref_logp=ref)
    loss.backward()
    assert m["kl"].item() == pytest.approx(value)
    assert loss.item() == pytest.approx(0.1 * value)  # zero advantage: the loss is the KL term
    assert logp.grad.item() == pytest.approx(0.1 * grad)


def test_k1_and_k3_are_unbiased_over_the_full_vocabulary():
    # E_{x~p}[k(x)] summed exactly over a 50-token vocabulary equals KL(p || q) = sum p log(p/q),
    # for distributions inside k3's stability clamps (|d| <= 20, k3 <= 10; see algo/kl.py).
    torch.manual_seed(0)
    logp = torch.log_softmax(0.3 * torch.randn(50, dtype=T64), 0)
    logq = torch.log_softmax(0.3 * torch.randn(50, dtype=T64), 0)
    assert float(kl_estimate(logp, logq, "k3").max()) < 10.0
    true_kl = float((logp.exp() * (logp - logq)).sum())
    for est in ("k1", "k3"):
        assert float((logp.exp() * kl_estimate(logp, logq, est)).sum()) == pytest.approx(true_kl, rel=1e-12)
    assert bool((kl_estimate(logp, logq, "k3") >= 0).all()) and bool((kl_estimate(logp, logq, "k2") >= 0).all())


def test_truncated_importance_sampling_by_hand():
    # token 0: pi_old/pi_rollout = 0.6/0.3 = 2 -> capped at 1.5; token 1: 0.3/0.6 = 0.5 -> kept
    old = torch.tensor([[math.log(0.6), math.log(0.3)]], dtype=T64)
    rollout = torch.tensor([[math.log(0.3), math.log(0.6)]], dtype=T64)
    logp = old.clone().requires_grad_(True)  # ratio 1: pg per token = -A
    adv = torch.tensor([[1.0, 2.0]], dtype=T64)
    mask = torch.ones(1, 2)
    cfg = LossConfig(tis_cap=1.5)
    loss, m = policy_loss(logp, old, adv, mask, cfg, normalizer=LossNormalizer.from_mask(mask),
                          rollout_logp=rollout)
    assert loss.item() == pytest.approx((-1.0 * 1.5 + -2.0 * 0.5) / 2)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-1.0 * 1.5 / 2, -2.0 * 0.5 / 2])
    assert m["tis_weight_mean"].item() == pytest.approx(1.0)
    assert m["tis_clip_frac"].item() == pytest.approx(0.5)
    assert m["rollout_logp_abs_diff_mean"].item() == pytest.approx(math.log(2))
    assert m["rollout_logp_abs_diff_max"].item() == pytest.approx(math.log(2))
    # k3 of KL(rollout || old) with r = old/rollout: (2 - 1 - log 2 + 0.5 - 1 + log 2) / 2
    assert m["rollout_kl"].item() == pytest.approx((1 - math.log(2) + -0.5 + math.log(2)) / 2)


def test_entropy_bonus_gradient():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    ent = torch.tensor([[2.0, 1.0, 9.0], [0.5, 7.0, 7.0]], requires_grad=True)
    logp = torch.zeros(2, 3, requires_grad=True)
    cfg = LossConfig(entropy_coef=0.01)
    loss, m = policy_loss(logp, logp.detach(), torch.zeros(2, 3), mask, cfg,
                          normalizer=LossNormalizer.from_mask(mask), entropy=ent)
    loss.backward()
    assert loss.item() == pytest.approx(-0.01 * (2.0 + 1.0 + 0.5) / 3)
    assert m["entropy"].item() == pytest.approx(3.5 / 3)
    expected = [[-0.01 / 3, -0.01 / 3, 0.0], [-0.01 / 3, 0.0, 0.0]]
    assert ent.grad.flatten().tolist() == pytest.approx([v for row in expected for v in row])


@pytest.mark.parametrize("aggregation,normalizer,expected", [
    # ratio 1, so per-token loss is -A. Row 0: [2] (1 token); row 1: [1, 1, 1] (3 tokens)
    ("token-mean", None, -(2 + 1 + 1 + 1) / 4),
    ("seq-mean-token-mean", None, -(2 / 1 + 3 / 3) / 2),
    ("seq-mean-token-sum", None, -(2 + 3) / 2),
    ("seq-mean-token-sum", 4.0, -(2 + 3) / (2 * 4)),  # Dr.GRPO constant divisor
])
def test_aggregation_modes_by_hand(aggregation, normalizer, expected):
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    adv = torch.tensor([[2.0, 5.0, 5.0], [1.0, 1.0, 1.0]])
    logp = torch.zeros(2, 3)
    cfg = LossConfig(aggregation=aggregation, seq_sum_normalizer=normalizer)
    loss, m = policy_loss(logp, logp, adv, mask, cfg, normalizer=LossNormalizer.from_mask(mask))
    assert loss.item() == pytest.approx(expected)
    assert m["pg_loss"].item() == pytest.approx(expected)


def test_padding_garbage_never_reaches_loss_or_gradient():
    mask = torch.tensor([[1, 1, 0]])
    logp = torch.tensor([[-1.0, -2.0, float("nan")]], requires_grad=True)
    old = torch.tensor([[-1.1, -2.0, float("inf")]])
    ref = torch.tensor([[-1.0, -1.0, float("-inf")]])
    ent = torch.tensor([[1.0, 1.0, float("nan")]], requires_grad=True)
    cfg = LossConfig(kl_coef=0.1, entropy_coef=0.01, tis_cap=2.0, dual_clip_c=3.0)
    loss, m = policy_loss(logp, old, torch.tensor([[1.0, -1.0, float("nan")]]), mask, cfg,
                          normalizer=LossNormalizer.from_mask(mask), ref_logp=ref, rollout_logp=old, entropy=ent)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v).all() for v in m.values())
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2].item() == 0.0
    assert torch.isfinite(ent.grad).all() and ent.grad[0, 2].item() == 0.0


def test_only_logp_and_entropy_get_gradients():
    mask = torch.ones(2, 2)
    logp = torch.randn(2, 2, requires_grad=True)
    others = {k: torch.randn(2, 2, requires_grad=True) for k in ("old", "adv", "ref", "roll")}
    cfg = LossConfig(kl_coef=0.1, tis_cap=2.0)
    loss, _ = policy_loss(logp, others["old"], others["adv"], mask, cfg, normalizer=LossNormalizer.from_mask(mask),
                          ref_logp=others["ref"], rollout_logp=others["roll"])
    loss.backward()
    assert logp.grad is not None
    assert all(t.grad is None for t in others.values())


# ---- micro-batch and data-parallel additivity ----------------------------------------------

@st.composite
def loss_batches(draw):
    b = draw(st.integers(2, 7))
    t = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    lengths = [draw(st.integers(0 if i else 1, t)) for i in range(b)]  # empty rows allowed (padding rows)
    cuts = sorted(draw(st.sets(st.integers(1, b - 1), max_size=b - 1)))
    return b, t, seed, lengths, cuts


@settings(max_examples=30, deadline=None)
@given(loss_batches(), st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]))
def test_micro_batch_split_sums_to_whole_batch(batch, aggregation):
    b, t, seed, lengths, cuts = batch
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(t)[None] < torch.tensor(lengths)[:, None]
    old = -torch.rand(b, t, generator=gen, dtype=T64) * 3
    logp_full = (old + 0.6 * torch.randn(b, t, generator=gen, dtype=T64)).requires_grad_(True)
    ent_full = (torch.rand(b, t, generator=gen, dtype=T64) * 2).requires_grad_(True)
    adv = torch.randn(b, t, generator=gen, dtype=T64)
    ref = old + 0.3 * torch.randn(b, t, generator=gen, dtype=T64)
    roll = old + 0.3 * torch.randn(b, t, generator=gen, dtype=T64)
    cfg = LossConfig(aggregation=aggregation, seq_sum_normalizer=3.0 if aggregation == "seq-mean-token-sum" else None,
                     dual_clip_c=2.5, kl_coef=0.05, entropy_coef=0.01, tis_cap=1.5)
    norm = LossNormalizer.from_mask(mask)

    def run(rows):
        return policy_loss(logp_full[rows], old[rows], adv[rows], mask[rows], cfg, normalizer=norm,
                           ref_logp=ref[rows], rollout_logp=roll[rows], entropy=ent_full[rows])

    whole, whole_metrics = run(slice(None))
    parts_of_loss = whole_metrics["pg_loss"] + whole_metrics["kl_loss"] + whole_metrics["entropy_loss"]
    assert parts_of_loss.item() == pytest.approx(whole.item(), rel=1e-12, abs=1e-12)
    g_logp, g_ent = torch.autograd.grad(whole, (logp_full, ent_full))
    bounds = [0, *cuts, b]
    parts = [run(slice(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    total = sum(loss for loss, _ in parts)
    p_logp, p_ent = torch.autograd.grad(total, (logp_full, ent_full))
    assert total.item() == pytest.approx(whole.item(), rel=1e-12, abs=1e-12)
    assert torch.allclose(p_logp, g_logp, rtol=1e-12, atol=1e-15)
    assert torch.allclose(p_ent, g_ent, rtol=1e-12, atol=1e-15)
    summed = combine_metrics([m for _, m in parts])
    assert summed.keys() == whole_metrics.keys()
    for key, value in whole_metrics.items():
        assert summed[key].item() == pytest.approx(value.item(), rel=1e-12, abs=1e-12), key


def test_normalizer_validation_and_from_mask():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    n = LossNormalizer.from_mask(mask)
    assert (n.num_tokens, n.num_seqs) == (3.0, 2.0)  # the empty row is not a sequence
    with pytest.raises(ValueError, match="num_tokens"):
        LossNormalizer(num_tokens=0, num_seqs=1)
    with pytest.raises(ValueError, match="num_seqs"):
        LossNormalizer(num_tokens=3, num_seqs=-1)
