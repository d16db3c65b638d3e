"""ERPO properties (ERPO.md) and agreement with the naive loop reference, on random batches."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from erpo_mega.algo import (
    ERPOConfig,
    erpo_terms,
    erpo_token_advantages,
    get_advantage_estimator,
    grpo_advantages,
)

from .erpo_reference import reference_erpo

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def batches(draw, max_groups=3, max_group_size=4, max_len=7):
    """Random prompt groups with uneven lengths; entropies on a quarter grid so ties happen."""
    n_groups = draw(st.integers(1, max_groups))
    sizes = [draw(st.integers(2, max_group_size)) for _ in range(n_groups)]
    group_ids = [g for g, size in enumerate(sizes) for _ in range(size)]
    n = len(group_ids)
    rewards = [draw(st.sampled_from([0.0, 1.0, 0.5, -1.0, 0.25])) for _ in range(n)]
    lengths = [draw(st.integers(1, max_len)) for _ in range(n)]
    entropies = [[draw(st.integers(0, 24)) / 4 for _ in range(t)] for t in lengths]
    return rewards, entropies, group_ids


@st.composite
def configs(draw):
    return ERPOConfig(
        gamma=draw(st.sampled_from([0.5, 1.0, 3.0])), tau=draw(st.sampled_from([0.5, 1.0])),
        num_buckets=draw(st.integers(1, 5)), beta=draw(st.sampled_from([0.0, 0.5, 2.0])),
        anchor=draw(st.sampled_from(["redistribute", "additive"])), gating=draw(st.booleans()),
        buckets=draw(st.booleans()), scale_by_std=draw(st.booleans()),
    )


def to_tensors(rewards, entropies, group_ids, pad_to=None, pad_value=0.0):
    width = pad_to or max(len(e) for e in entropies)
    h = torch.full((len(rewards), width), pad_value, dtype=torch.float64)
    mask = torch.zeros(len(rewards), width, dtype=torch.bool)
    for i, row in enumerate(entropies):
        h[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
        mask[i, : len(row)] = True
    return torch.tensor(rewards, dtype=torch.float64), h, mask, torch.tensor(group_ids)


def cfg_kwargs(cfg):
    return {k: getattr(cfg, k) for k in ("gamma", "tau", "num_buckets", "beta", "anchor", "gating", "buckets",
                                         "scale_by_std", "eps")}


@SETTINGS
@given(batches(), configs(), st.booleans())
def test_matches_naive_reference(batch, cfg, clamp):
    rewards, entropies, gids = batch
    adv, _ = erpo_token_advantages(*to_tensors(rewards, entropies, gids), cfg, clamp=clamp)
    ref, _, _ = reference_erpo(rewards, entropies, gids, clamp=clamp, **cfg_kwargs(cfg))
    for i, row in enumerate(ref):
        assert adv[i, : len(row)].tolist() == pytest.approx(row, rel=1e-7, abs=1e-7)
        assert adv[i, len(row):].abs().sum().item() == 0.0


@SETTINGS
@given(batches(), configs())
def test_cdp_flags_match_reference(batch, cfg):
    rewards, entropies, gids = batch
    terms = erpo_terms(*to_tensors(rewards, entropies, gids), cfg)
    _, _, ref_cdp = reference_erpo(rewards, entropies, gids, **cfg_kwargs(cfg))
    for i, row in enumerate(ref_cdp):
        assert terms.cdp[i, : len(row)].tolist() == row


@SETTINGS
@given(batches(), configs())
def test_beta_zero_is_grpo_exactly(batch, cfg):
    rewards, entropies, gids = batch
    cfg.beta = 0.0
    r, h, mask, g = to_tensors(rewards, entropies, gids)
    adv, _ = erpo_token_advantages(r, h, mask, g, cfg)
    grpo = grpo_advantages(r, g, scale_by_std=cfg.scale_by_std, eps=cfg.eps)
    assert torch.equal(adv, torch.where(mask, grpo[:, None], torch.zeros((), dtype=adv.dtype)))


@SETTINGS
@given(batches(), configs())
def test_redistribution_preserves_response_credit_and_sign(batch, cfg):
    rewards, entropies, gids = batch
    cfg.anchor = "redistribute"
    r, h, mask, g = to_tensors(rewards, entropies, gids)
    pre, _ = erpo_token_advantages(r, h, mask, g, cfg, clamp=False)
    post, _ = erpo_token_advantages(r, h, mask, g, cfg)
    grpo = grpo_advantages(r, g, scale_by_std=cfg.scale_by_std, eps=cfg.eps)
    # before the clamp, the masked mean of each response's token advantages is its GRPO advantage
    means = (pre * mask).sum(1) / mask.sum(1)
    assert means.tolist() == pytest.approx(grpo.tolist(), abs=1e-9)
    # after the clamp, no token has the opposite sign of its response's outcome; zero outcome -> zero tokens
    sign = torch.sign(grpo)[:, None]
    assert bool((post * sign >= 0).all())
    assert bool((post[grpo == 0] == 0).all())


@SETTINGS
@given(batches(), configs(), st.randoms(use_true_random=False))
def test_invariant_to_permuting_and_relabelling(batch, cfg, rnd):
    rewards, entropies, gids = batch
    r, h, mask, g = to_tensors(rewards, entropies, gids)
    adv, stats = erpo_token_advantages(r, h, mask, g, cfg)
    perm = list(range(len(rewards)))
    rnd.shuffle(perm)
    labels = rnd.sample(range(-1000, 1000), k=max(gids) + 1)  # new arbitrary, distinct ids
    p = torch.tensor(perm)
    g2 = torch.tensor([labels[i] for i in g[p].tolist()])
    adv2, stats2 = erpo_token_advantages(r[p], h[p], mask[p], g2, cfg)
    assert torch.allclose(adv2, adv[p], atol=1e-10, rtol=1e-10)
    assert stats2["cdp_fraction"] == pytest.approx(stats["cdp_fraction"])
    assert stats2["cdp_bucket_hist"] == pytest.approx(stats["cdp_bucket_hist"])


@SETTINGS
@given(batches(), configs(), st.integers(1, 5))
def test_invariant_to_extra_right_padding(batch, cfg, extra):
    rewards, entropies, gids = batch
    width = max(len(e) for e in entropies)
    r, h, mask, g = to_tensors(rewards, entropies, gids)
    adv, stats = erpo_token_advantages(r, h, mask, g, cfg)
    # padding holds garbage, even NaN: it must never reach the result
    r2, h2, mask2, g2 = to_tensors(rewards, entropies, gids, pad_to=width + extra, pad_value=float("nan"))
    adv2, stats2 = erpo_token_advantages(r2, h2, mask2, g2, cfg)
    assert torch.equal(adv2[:, :width], adv)
    assert adv2[:, width:].abs().sum().item() == 0.0
    assert stats2 == stats


@SETTINGS
@given(batches(), configs())
def test_ablation_switches(batch, cfg):
    rewards, entropies, gids = batch
    t = to_tensors(rewards, entropies, gids)
    mask = t[2]
    cfg.gating = False
    off = erpo_terms(*t, cfg)
    assert bool((off.gate[mask] == 1).all())
    cfg.gating, cfg.buckets = True, False
    nob = erpo_terms(*t, cfg)
    assert torch.equal(nob.bucket_score, nob.z)


def test_all_equal_rewards_give_zero_advantages_for_every_estimator():
    r = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    g = torch.tensor([0, 0, 1, 1, 1])
    h = torch.rand(5, 6)
    mask = torch.ones(5, 6)
    for name in ("erpo", "grpo", "dr_grpo"):
        adv, stats = get_advantage_estimator(name)(r, h, mask, g, ERPOConfig(beta=1.0))
        assert adv.abs().max().item() == 0.0, name
        assert stats["zero_adv_group_fraction"] == 1.0


def test_float32_inputs_give_float32_and_agree_with_float64():
    torch.manual_seed(0)
    r = torch.randint(0, 2, (16,)).float()
    r[::4] = 1.0
    g = torch.arange(16) // 4
    h = torch.rand(16, 12) * 3
    mask = torch.arange(12)[None] < torch.randint(1, 13, (16,))[:, None]
    adv32, _ = erpo_token_advantages(r, h, mask, g)
    adv64, _ = erpo_token_advantages(r.double(), h.double(), mask, g)
    assert adv32.dtype == torch.float32 and adv64.dtype == torch.float64
    assert torch.allclose(adv32.double(), adv64, atol=1e-6)
