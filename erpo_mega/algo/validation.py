"""Input checks for the advantage estimators: fail early, name the argument, say what was found.

A silent NaN in one reward or an empty response would otherwise spread through the group
statistics and poison every token of the group, hours into a run.
"""

from __future__ import annotations

import torch


def _fail(name: str, message: str) -> None:
    raise ValueError(f"{name}: {message}")


def check_tensor(value, name: str, *, ndim: int, kind: str) -> torch.Tensor:
    """`kind` is 'float', 'int' or 'mask' (bool, or an integer/float tensor holding only 0 and 1)."""
    if not isinstance(value, torch.Tensor):
        _fail(name, f"expected a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        _fail(name, f"expected {ndim} dimension(s), got shape {tuple(value.shape)}")
    if kind == "float" and not value.is_floating_point():
        _fail(name, f"expected a floating-point tensor, got dtype {value.dtype}")
    if kind == "int" and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        _fail(name, f"expected an integer tensor, got dtype {value.dtype}")
    if kind == "mask":
        if value.is_complex():
            _fail(name, f"expected a bool or 0/1 tensor, got dtype {value.dtype}")
        if value.dtype != torch.bool and not bool(((value == 0) | (value == 1)).all()):
            _fail(name, "must contain only 0 and 1 (or be a bool tensor)")
    return value


def check_finite(values: torch.Tensor, name: str, where: torch.Tensor | None = None) -> None:
    """Reject NaN/inf in `values` (only at positions where `where` is true, if given)."""
    bad = ~torch.isfinite(values)
    if where is not None:
        bad = bad & where
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0].tolist())
        _fail(name, f"non-finite value {values[index].item()} at index {index}"
              + (" (inside the response mask)" if where is not None else ""))


def check_group_inputs(rewards, entropy, response_mask, group_ids, *, need_entropy: bool) -> torch.Tensor:
    """Validate estimator inputs and return the mask as bool [N, T] (or None when no mask is given)."""
    check_tensor(rewards, "rewards", ndim=1, kind="float")
    check_tensor(group_ids, "group_ids", ndim=1, kind="int")
    n = rewards.shape[0]
    if n == 0:
        _fail("rewards", "is empty; need at least one prompt group")
    if group_ids.shape[0] != n:
        _fail("group_ids", f"has {group_ids.shape[0]} entries but rewards has {n}")
    check_finite(rewards, "rewards")
    mask = None
    if response_mask is not None:
        check_tensor(response_mask, "response_mask", ndim=2, kind="mask")
        if response_mask.shape[0] != n:
            _fail("response_mask", f"has {response_mask.shape[0]} rows but rewards has {n}")
        mask = response_mask.bool()
        empty = (~mask.any(dim=1)).nonzero()
        if empty.numel():
            _fail("response_mask", f"row {int(empty[0])} is all zero (an empty response); drop it or give it "
                  "at least one token")
    if entropy is None:
        if need_entropy:
            _fail("entropy", "is required by this estimator")
    else:
        check_tensor(entropy, "entropy", ndim=2, kind="float")
        if mask is None:
            _fail("response_mask", "is required when entropy is given")
        if entropy.shape != mask.shape:
            _fail("entropy", f"shape {tuple(entropy.shape)} does not match response_mask {tuple(mask.shape)}")
        if entropy.device != rewards.device:
            _fail("entropy", f"is on {entropy.device} but rewards is on {rewards.device}")
        check_finite(entropy, "entropy", where=mask)
    for name, t in (("group_ids", group_ids), ("response_mask", response_mask)):
        if t is not None and t.device != rewards.device:
            _fail(name, f"is on {t.device} but rewards is on {rewards.device}")
    ids, counts = torch.unique(group_ids, return_counts=True)
    lonely = (counts < 2).nonzero()
    if lonely.numel():
        _fail("group_ids", f"group {int(ids[lonely[0]])} has a single response; group-relative advantages "
              "need at least 2 responses per prompt")
    return mask
