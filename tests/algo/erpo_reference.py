"""A deliberately naive ERPO reference: plain Python lists and loops, read straight off ERPO.md.

It shares no code with erpo_mega.algo (no torch, no scatter ops, its own progress-bucket
arithmetic via fractions), so agreement between the two is evidence, not tautology.
Population std everywhere (statistics.pstdev), as erpo_mega.algo documents.
"""

from __future__ import annotations

import math
import statistics
from fractions import Fraction


def sgn(x: float) -> float:
    return (x > 0) - (x < 0)


def bucket_of(k: int, length: int, num_buckets: int) -> int:
    p = Fraction(2 * k + 1, 2 * length)  # (k + 0.5) / T exactly
    return min(num_buckets - 1, math.floor(num_buckets * p))


def reference_erpo(rewards, entropies, group_ids, *, gamma=1.0, tau=1.0, num_buckets=8, beta=0.5,
                   anchor="redistribute", gating=True, buckets=True, scale_by_std=True, eps=1e-6, clamp=True):
    """rewards: list[float]; entropies: list of per-response lists (masked tokens only).

    Returns (token advantages as list of lists, outcome advantages, list of CDP flags per response).
    """
    n = len(rewards)
    out = [None] * n
    outcome = [0.0] * n
    cdp = [None] * n
    for gid in sorted(set(group_ids)):
        members = [i for i in range(n) if group_ids[i] == gid]
        rs = [rewards[i] for i in members]
        mean_r = statistics.fmean(rs)
        std_r = statistics.pstdev(rs)
        for i in members:
            if len(set(rs)) == 1:
                outcome[i] = 0.0
            elif scale_by_std:
                outcome[i] = (rewards[i] - mean_r) / (std_r + eps)
            else:
                outcome[i] = rewards[i] - mean_r
        all_h = [h for i in members for h in entropies[i]]
        mu_g, sd_g = statistics.fmean(all_h), statistics.pstdev(all_h)
        z = {i: [(h - mu_g) / (sd_g + eps) for h in entropies[i]] for i in members}
        w = {i: [1 / (1 + math.exp(-gamma * v)) if gating else 1.0 for v in z[i]] for i in members}
        b = {i: [bucket_of(k, len(entropies[i]), num_buckets) for k in range(len(entropies[i]))] for i in members}
        if buckets:
            s = {}
            for i in members:
                s[i] = []
                for k, h in enumerate(entropies[i]):
                    peers = [entropies[j][q] for j in members for q in range(len(entropies[j])) if b[j][q] == b[i][k]]
                    sd_b = statistics.pstdev(peers)
                    if len(peers) <= 1 or sd_b == 0:
                        s[i].append(0.0)
                    else:
                        s[i].append((h - statistics.fmean(peers)) / (sd_b + eps))
        else:
            s = z
        u = {i: [w[i][k] * s[i][k] for k in range(len(s[i]))] for i in members}
        sd_u = statistics.pstdev([v for i in members for v in u[i]])
        for i in members:
            u_hat = [v / (sd_u + eps) for v in u[i]]
            centre = statistics.fmean(u_hat) if anchor == "redistribute" else 0.0
            a = outcome[i]
            vals = [a + beta * sgn(a) * (v - centre) for v in u_hat]
            if clamp:
                vals = [sgn(a) * max(0.0, sgn(a) * v) for v in vals]
            out[i] = vals
            cdp[i] = [v > tau for v in z[i]]
    return out, outcome, cdp
