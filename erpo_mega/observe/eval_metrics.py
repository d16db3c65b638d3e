"""avg@k and pass@k, the way reasoning papers report sampled evaluation (numpy only).

With n samples per problem of which c are correct:
    avg@n       the mean correctness over all n samples, averaged over problems (the estimate
                of pass@1 that uses every sample, which is why papers report it next to pass@k);
    pass@k      the chance that at least one of k samples drawn without replacement from the
                n is correct: 1 - C(n-c, k) / C(n, k) (the unbiased estimator of Chen et al.,
                2021), averaged over problems. Computing it as a product of (1 - k/i) terms
                avoids the huge binomials and is exact up to float rounding.
Kept free of torch.distributed and of the trainer so tests can check it against brute force.
"""

from __future__ import annotations

import numpy as np


def _as_matrix(correct) -> np.ndarray:
    m = np.asarray(correct)
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"correct: expected a non-empty [problems, samples] matrix, got shape {m.shape}")
    return m.astype(bool)


def pass_at_k_problem(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `c` correct out of `n` samples (1 <= k <= n)."""
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k(correct, k: int) -> float:
    """Mean unbiased pass@k over problems; `correct` is a [problems, n] 0/1 matrix."""
    m = _as_matrix(correct)
    n = m.shape[1]
    return float(np.mean([pass_at_k_problem(n, int(c), k) for c in m.sum(axis=1)]))


def avg_at_k(correct) -> float:
    """Mean correctness over all samples and problems (avg@n for a [problems, n] matrix)."""
    return float(_as_matrix(correct).mean())


def default_ks(samples: int) -> list[int]:
    """1, 2, 4, ... up to `samples`, and `samples` itself (papers report pass@1 and pass@k)."""
    ks, k = [], 1
    while k < samples:
        ks.append(k)
        k *= 2
    return ks + [samples]


def sampled_eval_metrics(correct, response_lens, truncated, ks: list[int] | None = None) -> dict[str, float]:
    """Per-set numbers: avg@n, pass@k for each k, response length mean/median, truncation rate.

    `correct`, `response_lens` and `truncated` are [problems, n] (row i: the n samples of problem i).
    """
    m = _as_matrix(correct)
    n = m.shape[1]
    lens = np.asarray(response_lens, dtype=np.float64)
    trunc = np.asarray(truncated, dtype=bool)
    if lens.shape != m.shape or trunc.shape != m.shape:
        raise ValueError(f"response_lens {lens.shape} and truncated {trunc.shape} must match correct {m.shape}")
    ks = default_ks(n) if ks is None else sorted(set(ks))
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"pass@k: every k must be in [1, samples={n}], got {bad}")
    out = {f"avg@{n}": avg_at_k(m)}
    for k in ks:
        out[f"pass@{k}"] = pass_at_k(m, k)
    out.update({
        "response_len_mean": float(lens.mean()),
        "response_len_median": float(np.median(lens)),
        "truncated_fraction": float(trunc.mean()),
        "num_prompts": float(m.shape[0]),
        "samples": float(n),
    })
    return out
