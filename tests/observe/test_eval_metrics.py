"""avg@k / pass@k against a hand-computed table and brute-force enumeration of k-subsets."""

import itertools

import numpy as np
import pytest

from erpo_mega.observe.eval_metrics import avg_at_k, default_ks, pass_at_k, sampled_eval_metrics


def test_hand_computed_example():
    # 3 problems x 4 samples: 1, 0 and 3 correct.
    correct = [[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]]
    # pass@2 per problem: 1 - C(3,2)/C(4,2) = 1/2; 0; 1 - C(1,2)/C(4,2) = 1.
    assert pass_at_k(correct, 1) == pytest.approx((1 / 4 + 0 + 3 / 4) / 3)
    assert pass_at_k(correct, 2) == pytest.approx((1 / 2 + 0 + 1) / 3)
    # pass@3: 1 - C(3,3)/C(4,3) = 3/4; 0; 1.
    assert pass_at_k(correct, 3) == pytest.approx((3 / 4 + 0 + 1) / 3)
    assert pass_at_k(correct, 4) == pytest.approx(2 / 3)
    assert avg_at_k(correct) == pytest.approx(4 / 12)


def _brute_pass_at_k(row, k):
    subsets = list(itertools.combinations(range(len(row)), k))
    return sum(any(row[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_random_matrices(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 11))
    correct = rng.random((int(rng.integers(1, 8)), n)) < rng.random()
    for k in range(1, n + 1):
        want = np.mean([_brute_pass_at_k(row, k) for row in correct])
        assert pass_at_k(correct, k) == pytest.approx(want, abs=1e-12), (n, k)
    # avg@n is the mean of pass@1 over problems, and equals the brute-force pass@1
    assert avg_at_k(correct) == pytest.approx(np.mean([_brute_pass_at_k(row, 1) for row in correct]))


def test_pass_at_k_is_monotone_and_pass_at_n_is_any_correct():
    rng = np.random.default_rng(7)
    correct = rng.random((20, 16)) < 0.2
    vals = [pass_at_k(correct, k) for k in range(1, 17)]
    assert all(a <= b + 1e-12 for a, b in zip(vals, vals[1:]))
    assert vals[-1] == pytest.approx(correct.any(axis=1).mean())


def test_sampled_eval_metrics_table():
    correct = [[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]]
    lens = [[10, 20, 30, 40], [5, 5, 5, 5], [1, 2, 3, 100]]
    trunc = [[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 1]]
    m = sampled_eval_metrics(correct, lens, trunc)
    assert sorted(k for k in m if k.startswith("pass@")) == ["pass@1", "pass@2", "pass@4"]
    assert m["avg@4"] == pytest.approx(1 / 3) and m["pass@4"] == pytest.approx(2 / 3)
    assert m["response_len_mean"] == pytest.approx(np.mean(lens))
    assert m["response_len_median"] == pytest.approx(5.0)  # sorted: 1 2 3 5 5 5 5 10 ... -> (5+5)/2
    assert m["truncated_fraction"] == pytest.approx(2 / 12)
    assert m["num_prompts"] == 3 and m["samples"] == 4


def test_bad_inputs_are_named():
    assert default_ks(1) == [1] and default_ks(32) == [1, 2, 4, 8, 16, 32] and default_ks(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="k must be"):
        pass_at_k([[1, 0]], 3)
    with pytest.raises(ValueError, match="every k"):
        sampled_eval_metrics([[1, 0]], [[1, 1]], [[0, 0]], ks=[0, 1])
    with pytest.raises(ValueError, match="must match"):
        sampled_eval_metrics([[1, 0]], [[1]], [[0, 0]])
