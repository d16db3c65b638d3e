"""Per-segment (per group, per bucket, per response) statistics with scatter ops.

Every ERPO statistic is a mean or a population standard deviation over an irregular set of
tokens (a prompt group, a progress bucket inside a group, one response). Computing them with
index_add over a flat list of masked tokens keeps the cost linear in the number of tokens,
with no Python loop over groups. Callers pass float64 values so the sums stay exact enough.
"""

from __future__ import annotations

import torch


def dense_index(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary integer ids to 0..n-1 (order of first appearance does not matter)."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    return inverse, int(unique.numel())


def segment_sum(values: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    out = torch.zeros(num_segments, dtype=values.dtype, device=values.device)
    return out.index_add_(0, segment, values)


def segment_count(segment: torch.Tensor, num_segments: int, dtype: torch.dtype) -> torch.Tensor:
    return segment_sum(torch.ones(segment.shape, dtype=dtype, device=segment.device), segment, num_segments)


def segment_mean_std(values: torch.Tensor, segment: torch.Tensor, num_segments: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, population std (divide by n) and count of `values` per segment.

    Two passes (mean first, then squared deviations) avoid the cancellation of E[x^2]-E[x]^2.
    Empty segments get mean 0, std 0, count 0.
    """
    count = segment_count(segment, num_segments, values.dtype)
    safe = count.clamp(min=1)
    mean = segment_sum(values, segment, num_segments) / safe
    dev = values - mean[segment]
    var = segment_sum(dev * dev, segment, num_segments) / safe
    return mean, var.sqrt(), count


def segment_all_equal(values: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """True for segments whose values are all identical (exactly, not up to rounding)."""
    lo = torch.full((num_segments,), float("inf"), dtype=values.dtype, device=values.device)
    hi = torch.full((num_segments,), float("-inf"), dtype=values.dtype, device=values.device)
    lo = lo.scatter_reduce(0, segment, values, reduce="amin")
    hi = hi.scatter_reduce(0, segment, values, reduce="amax")
    return lo == hi


def segment_zscore(values: torch.Tensor, segment: torch.Tensor, num_segments: int, eps: float) -> torch.Tensor:
    """(x - mean) / (std + eps) per segment; exactly 0 in segments whose values are all equal.

    Exact arithmetic gives 0 there, but a rounded mean (0.1 + 0.1 + 0.1 != 0.3) would leave
    noise of order 1e-17 / eps, and later normalisations could blow that up.
    """
    mean, std, _ = segment_mean_std(values, segment, num_segments)
    z = (values - mean[segment]) / (std[segment] + eps)
    flat = segment_all_equal(values, segment, num_segments)
    return torch.where(flat[segment], torch.zeros_like(z), z)
