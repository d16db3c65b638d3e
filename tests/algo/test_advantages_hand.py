"""Hand-worked ERPO/GRPO examples: every intermediate written out with plain arithmetic."""

import math

import pytest
import torch

from erpo_mega.algo import ERPOConfig, erpo_terms, erpo_token_advantages, grpo_advantages

EPS = 1e-12  # small enough that the hand arithmetic below may ignore it


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def pstd(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def t64(rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---- section 1: outcome advantage -----------------------------------------------------------

def test_grpo_two_groups_population_std_non_contiguous_ids():
    # group 5: rewards 1, 0, 0 (rows 0, 2, 3); group -2: rewards 0.5, 1.5 (rows 1, 4)
    rewards = t64([1.0, 0.5, 0.0, 0.0, 1.5])
    gids = torch.tensor([5, -2, 5, 5, -2])
    adv = grpo_advantages(rewards, gids, eps=EPS)
    # group 5: mean 1/3, population std sqrt((4/9 + 1/9 + 1/9) / 3) = sqrt(2)/3
    sd5 = math.sqrt(2) / 3
    # group -2: mean 1, population std 0.5 -> advantages -1, +1
    expected = [(2 / 3) / sd5, -1.0, (-1 / 3) / sd5, (-1 / 3) / sd5, 1.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-9)
    assert expected[0] == pytest.approx(math.sqrt(2), abs=1e-12)  # the hand value, for the reader


def test_dr_grpo_no_std_scaling():
    adv = grpo_advantages(t64([1.0, 0.0, 0.0, 0.0]), torch.tensor([0, 0, 0, 0]), scale_by_std=False)
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25], abs=1e-12)


def test_equal_rewards_give_exact_zero_even_when_the_mean_rounds():
    # 0.1 + 0.1 + 0.1 != 0.3 in floating point; the advantage must still be exactly 0, with no sign.
    rewards = t64([0.1, 0.1, 0.1])
    assert grpo_advantages(rewards, torch.tensor([1, 1, 1])).tolist() == [0.0, 0.0, 0.0]
    h = t64([[0.1, 3.0], [2.0, 0.2], [1.0, 1.0]])
    adv, stats = erpo_token_advantages(rewards, h, torch.ones(3, 2), torch.tensor([1, 1, 1]),
                                       ERPOConfig(beta=2.0))
    assert adv.abs().max().item() == 0.0
    assert stats["zero_adv_group_fraction"] == 1.0


def test_default_eps_is_in_the_denominator():
    adv = grpo_advantages(t64([1.0, 0.0]), torch.tensor([0, 0]), eps=0.5)
    assert adv.tolist() == pytest.approx([0.5 / (0.5 + 0.5), -0.5 / (0.5 + 0.5)])


# ---- section 3: progress buckets ------------------------------------------------------------

def test_progress_buckets_by_hand():
    # T=3, K=8: p = 1/6, 1/2, 5/6 -> 8p = 1.33, 4, 6.67 -> buckets 1, 4, 6
    # T=5, K=2: p = .1 .3 .5 .7 .9 -> 2p = .2 .6 1.0 1.4 1.8 -> 0 0 1 1 1 (p = 0.5 exactly is bucket 1)
    # T=1, K=8: p = 1/2 -> 4
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    h = torch.rand(4, 5, dtype=torch.float64)
    terms8 = erpo_terms(t64([1, 0, 1, 0]), h, mask, torch.tensor([0, 0, 1, 1]), ERPOConfig(num_buckets=8))
    terms2 = erpo_terms(t64([1, 0, 1, 0]), h, mask, torch.tensor([0, 0, 1, 1]), ERPOConfig(num_buckets=2))
    assert terms8.bucket[0].tolist() == [1, 4, 6, -1, -1]
    assert terms8.bucket[2].tolist() == [4, -1, -1, -1, -1]
    assert terms2.bucket[1].tolist() == [0, 0, 1, 1, 1]
    # K=8, T=5: 8p = 0.8 2.4 4 5.6 7.2 -> 0 2 4 5 7
    assert terms8.bucket[3].tolist() == [0, 2, 4, 5, 7]


# ---- sections 2-4 on a worked group ---------------------------------------------------------

def _group_two():
    """G=2, two tokens each, K=2. r=[1, 0]; H0=[1, 3], H1=[1, 1]."""
    rewards = t64([1.0, 0.0])
    h = t64([[1.0, 3.0, 9.9], [1.0, 1.0, 9.9]])  # column 2 is padding (garbage entropy)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    return rewards, h, mask, torch.tensor([0, 0])


def _group_two_by_hand(beta, clamp=True):
    # A = (r - 0.5) / 0.5 = [+1, -1]
    # group entropy: values 1, 3, 1, 1 -> mean 1.5, population std sqrt(0.75)
    sd = math.sqrt(0.75)
    z = [[-0.5 / sd, 1.5 / sd], [-0.5 / sd, -0.5 / sd]]
    w = [[sigmoid(v) for v in row] for row in z]
    # buckets (K=2, T=2): token 0 -> bucket 0, token 1 -> bucket 1
    # bucket 0 = {1, 1}: zero spread -> s = 0.  bucket 1 = {3, 1}: mean 2, std 1 -> s = +1, -1
    s = [[0.0, 1.0], [0.0, -1.0]]
    u = [[w[i][k] * s[i][k] for k in range(2)] for i in range(2)]
    sd_u = pstd(u[0] + u[1])
    u_hat = [[v / sd_u for v in row] for row in u]
    adv = []
    for i, a in enumerate([1.0, -1.0]):
        centre = sum(u_hat[i]) / 2
        row = [a + beta * a * (v - centre) for v in u_hat[i]]  # sgn(A) = A here
        if clamp:
            row = [a * max(0.0, a * v) for v in row]
        adv.append(row + [0.0])
    return z, w, s, adv


def test_worked_group_every_intermediate():
    rewards, h, mask, gids = _group_two()
    terms = erpo_terms(rewards, h, mask, gids, ERPOConfig(num_buckets=2, beta=0.5, eps=EPS))
    z, w, s, adv = _group_two_by_hand(beta=0.5)
    assert terms.outcome.tolist() == pytest.approx([1.0, -1.0])
    assert terms.z[:, :2].tolist()[0] == pytest.approx(z[0]) and terms.z[:, :2].tolist()[1] == pytest.approx(z[1])
    assert terms.gate[:, :2].flatten().tolist() == pytest.approx(w[0] + w[1])
    assert terms.bucket_score[:, :2].flatten().tolist() == pytest.approx(s[0] + s[1])
    assert terms.advantages.flatten().tolist() == pytest.approx(adv[0] + adv[1], abs=1e-9)
    # The printed numbers, rounded, for the reader: credit moves to the pivot (entropy 3).
    assert terms.advantages[0, :2].tolist() == pytest.approx([0.5224, 1.4776], abs=1e-4)
    assert terms.advantages[1, :2].tolist() == pytest.approx([-1.2021, -0.7979], abs=1e-4)
    # CDP: z > tau = 1 only for the entropy-3 token (z = 1.732)
    assert terms.cdp.tolist() == [[False, True, False], [False, False, False]]


def test_worked_group_stats():
    rewards, h, mask, gids = _group_two()
    _, stats = erpo_token_advantages(rewards, h, mask, gids, ERPOConfig(num_buckets=2, eps=EPS))
    assert stats["cdp_fraction"] == pytest.approx(1 / 4)
    assert stats["entropy_mean"] == pytest.approx(1.5)
    assert stats["entropy_mean_cdp"] == pytest.approx(3.0)
    assert stats["cdp_bucket_hist"] == pytest.approx([0.0, 1.0])
    assert stats["gate_mean"] == pytest.approx((sigmoid(-0.5 / math.sqrt(0.75)) * 3
                                                + sigmoid(1.5 / math.sqrt(0.75))) / 4)


def test_worked_group_clamp_both_signs():
    # beta = 3 pushes token 0 of the correct response below 0 and token 1 of the wrong one above 0.
    rewards, h, mask, gids = _group_two()
    cfg = ERPOConfig(num_buckets=2, beta=3.0, eps=EPS)
    _, _, _, pre = _group_two_by_hand(beta=3.0, clamp=False)
    _, _, _, post = _group_two_by_hand(beta=3.0, clamp=True)
    assert pre[0][0] < 0 and pre[1][1] > 0  # the hand numbers cross zero ...
    assert post[0][0] == 0.0 and post[1][1] == 0.0  # ... and the clamp zeroes them
    got_pre, _ = erpo_token_advantages(rewards, h, mask, gids, cfg, clamp=False)
    got, stats = erpo_token_advantages(rewards, h, mask, gids, cfg)
    assert got_pre.flatten().tolist() == pytest.approx(pre[0] + pre[1], abs=1e-9)
    assert got.flatten().tolist() == pytest.approx(post[0] + post[1], abs=1e-9)
    assert stats["clamp_fraction"] == pytest.approx(2 / 4)


def test_three_responses_uneven_lengths_additive_anchor():
    # r = [1, 0, 0] -> A = [sqrt(2), -1/sqrt(2), -1/sqrt(2)] (mean 1/3, population std sqrt(2)/3)
    # lengths 3, 1, 2; K = 2 -> buckets [0, 1, 1], [1], [0, 1]
    rewards = t64([1.0, 0.0, 0.0])
    h = t64([[0.5, 2.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    cfg = ERPOConfig(num_buckets=2, beta=0.5, anchor="additive", eps=EPS)
    adv, _ = erpo_token_advantages(rewards, h, mask, torch.tensor([4, 4, 4]), cfg, clamp=False)

    A = [math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2)]
    tokens = [[0.5, 2.0, 0.5], [1.0], [0.0, 1.0]]
    flat = [0.5, 2.0, 0.5, 1.0, 0.0, 1.0]
    mu, sd = sum(flat) / 6, pstd(flat)  # 5/6, ...
    # bucket 0 = {0.5 (r0 t0), 0.0 (r2 t0)}: mean 0.25, std 0.25 -> s = +1, -1
    # bucket 1 = {2.0, 0.5, 1.0, 1.0}: mean 1.125
    b1 = [2.0, 0.5, 1.0, 1.0]
    m1, sd1 = 1.125, pstd(b1)
    s = [[1.0, (2.0 - m1) / sd1, (0.5 - m1) / sd1], [(1.0 - m1) / sd1], [-1.0, (1.0 - m1) / sd1]]
    u = [[sigmoid((tokens[i][k] - mu) / sd) * s[i][k] for k in range(len(tokens[i]))] for i in range(3)]
    sd_u = pstd([v for row in u for v in row])
    for i in range(3):
        sign = 1.0 if A[i] > 0 else -1.0
        expected = [A[i] + 0.5 * sign * v / sd_u for v in u[i]]
        got = adv[i, : len(expected)].tolist()
        assert got == pytest.approx(expected, abs=1e-9)
        assert adv[i, len(expected):].abs().sum().item() == 0.0


def test_single_token_bucket_gives_zero_score():
    # K = 4, both responses have 1 token -> both in bucket 2; response lengths 1 and 3 ->
    # long response tokens go to buckets 0, 2, 3. Buckets 0 and 3 hold one token each -> s = 0.
    rewards = t64([1.0, 0.0])
    h = t64([[1.0, 0.0, 0.0], [5.0, 3.0, 7.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    terms = erpo_terms(rewards, h, mask, torch.tensor([0, 0]), ERPOConfig(num_buckets=4, eps=EPS))
    assert terms.bucket.tolist() == [[2, -1, -1], [0, 2, 3]]
    # bucket 2 = {1 (r0), 3 (r1 t1)}: mean 2, std 1 -> s = -1, +1
    assert terms.bucket_score.flatten().tolist() == pytest.approx([-1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def test_zero_spread_is_exactly_zero_despite_rounding():
    # Entropy 0.1 everywhere in group 0: mean(0.1, 0.1, ...) rounds, yet z and s must be exactly 0,
    # so with a tiny eps no rounding noise gets normalised up into a token signal.
    rewards = t64([1.0, 0.0, 0.0])
    h = t64([[0.1, 0.1, 0.1], [0.1, 0.1, 0.1], [0.1, 0.1, 0.1]])
    cfg = ERPOConfig(num_buckets=1, beta=1.0, eps=1e-15)
    terms = erpo_terms(rewards, h, torch.ones(3, 3), torch.tensor([0, 0, 0]), cfg)
    assert terms.z.abs().max().item() == 0.0
    assert terms.bucket_score.abs().max().item() == 0.0
    grpo = grpo_advantages(rewards, torch.tensor([0, 0, 0]), eps=1e-15)
    assert torch.equal(terms.advantages, grpo[:, None].expand(3, 3))
    # a bucket (here K=1: the whole group) of 0.1s next to a group with spread: same rule per bucket
    h2 = t64([[0.1, 0.1], [0.1, 0.1], [0.1, 0.1], [0.0, 1.0], [1.0, 0.0]])
    terms2 = erpo_terms(t64([1.0, 0.0, 0.0, 1.0, 0.0]), h2, torch.ones(5, 2), torch.tensor([0, 0, 0, 1, 1]),
                        ERPOConfig(num_buckets=2, eps=1e-15))
    assert terms2.bucket_score[:3].abs().max().item() == 0.0
    assert terms2.bucket_score[3:].flatten().tolist() == pytest.approx([-1.0, 1.0, 1.0, -1.0])
