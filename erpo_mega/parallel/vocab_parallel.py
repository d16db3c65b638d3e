"""Per-token log-probability and entropy from vocabulary-sharded logits, without gathering the vocab.

Under tensor parallelism each rank holds logits for a vocabulary slice `[..., V/TP]` (megatron's
sharding: rank r owns ids [r*V/TP, (r+1)*V/TP)). Gathering the full vocabulary in fp32 for every
response token (152k entries for Qwen) is what runs trainers out of memory, so this module
reduces per-token *scalars* across the TP group instead:

    forward:  per token, local max, sum e^d, sum e^d d (d = x - local max), target logit
              -> two all-reduces ([tokens] MAX, [tokens, 3] SUM, fp32), once per call, not per chunk;
    backward: no communication (the global max, log-normaliser and entropy are saved per token).

    with x = z / T,  M = max_j x_j,  Z = sum_j e^(x_j - M):
    logp_t = (x_t - M) - log Z           H = log Z - sum_j p_j (x_j - M)   (two terms >= 0)
    dlogp_t/dz_j = (1[j=t] - p_j) / T    dH/dz_j = -p_j (log p_j + H) / T

Tokens are processed in chunks: besides the logits gradient itself (same shape and dtype as the
logits, as for any autograd op), the extra memory is two fp32 `[chunk, V/TP]` buffers and a few
fp32 scalars per token, independent of the sequence length; backward recomputes the softmax per
chunk instead of saving it. The caller's logits are never written to (megatron's
`vocab_parallel_cross_entropy` does write to them). Results are fp32 whatever the logits dtype.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist

DEFAULT_CHUNK_BYTES = 256 * 2**20
"""Working-memory budget per chunk when `chunk_size=None` (two fp32 `[chunk, V/TP]` buffers)."""

_WORKING_BUFFERS = 2
# Logits of -inf (masked vocab entries) are clamped here so that exp(d) * d stays 0 instead of NaN;
# any real logit is far above it, so no probability changes.
_NEG_FLOOR = -1e30


def default_chunk_size(vocab_shard: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that the fp32 working buffers fit in `budget_bytes`."""
    return max(1, budget_bytes // (_WORKING_BUFFERS * 4 * max(1, vocab_shard)))


def resolve_tp_group(tp_group=None):
    """The group to reduce over: the given one, megatron's TP group when initialised, else None (one rank).

    megatron is only consulted when it is already imported: a process that never imported it
    cannot have initialised model parallelism, and importing it costs seconds.
    """
    if tp_group is not None:
        return tp_group
    if not dist.is_available() or not dist.is_initialized():
        return None
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        return ps.get_tensor_model_parallel_group()
    return None


def _group_rank_and_size(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"tp_group: global rank {dist.get_rank()} is not a member of the given group")
    return rank, dist.get_world_size(group)


def _vocab_range(vocab_shard: int, rank: int, world: int) -> tuple[int, int]:
    if world == 1:
        return 0, vocab_shard
    from megatron.core.tensor_parallel.utils import VocabUtility

    first, last = VocabUtility.vocab_range_from_per_partition_vocab_size(vocab_shard, rank, world)
    return int(first), int(last)


def _token_order(logits: torch.Tensor) -> list[int]:
    """Leading dims ordered by stride, so that `[tokens, V_shard]` is a view, not a copy.

    megatron's output is [S, B, V]; callers usually hand in its transpose [B, S, V], which
    `reshape` would copy in full. Per-token tensors are flattened in the same order.
    """
    return sorted(range(logits.dim() - 1), key=lambda d: -logits.stride(d))


def _flat_logits(logits: torch.Tensor, order: list[int]) -> torch.Tensor:
    permuted = logits.permute(*order, logits.dim() - 1)
    try:
        return permuted.view(-1, logits.shape[-1])
    except RuntimeError:  # not expressible as a view: one copy, as reshape would do
        return permuted.reshape(-1, logits.shape[-1])


def _flat_tokens(values: torch.Tensor, order: list[int]) -> torch.Tensor:
    return values.permute(order).reshape(-1)


def _unflat_tokens(values: torch.Tensor, shape: torch.Size, order: list[int]) -> torch.Tensor:
    """Inverse of `_flat_tokens`: [tokens] -> the logits' leading shape."""
    inverse = [order.index(d) for d in range(len(order))]
    return values.view([shape[d] for d in order]).permute(inverse)


def _scaled_fp32(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    """A fresh fp32 `chunk / temperature`, -inf floored; never an alias of the caller's tensor."""
    x = chunk.float()
    fresh = x is not chunk
    if temperature != 1.0:
        x = x.div_(temperature) if fresh else x / temperature
        fresh = True
    return x.clamp_(min=_NEG_FLOOR) if fresh else x.clamp(min=_NEG_FLOOR)


def _chunk_statistics(chunk: torch.Tensor, local_t: torch.Tensor, temperature: float,
                      out_max: torch.Tensor, out_sums: torch.Tensor) -> None:
    """Per-token local max m, sum e^d, sum e^d d (d = x - m) and x[local_t] of one chunk, into the outputs.

    Two fp32 `[chunk, V_shard]` temporaries, freed on return.
    """
    x = _scaled_fp32(chunk, temperature)
    out_sums[:, 2] = x.gather(1, local_t[:, None]).squeeze(1)
    m = x.amax(dim=1)
    out_max.copy_(m)
    d = x.sub_(m[:, None])
    e = torch.exp(d)
    out_sums[:, 0] = e.sum(dim=1)
    out_sums[:, 1] = e.mul_(d).sum(dim=1)


def _chunk_grad(chunk: torch.Tensor, local_t: torch.Tensor, own: torch.Tensor, temperature: float,
                global_max: torch.Tensor, log_z: torch.Tensor, entropy: torch.Tensor,
                ng_lp: torch.Tensor | None, ng_h: torch.Tensor | None, out: torch.Tensor) -> None:
    """Gradient w.r.t. one chunk of logits into `out`; `ng_*` are -upstream/T per token (None: no term).

    grad_j = -p_j (g_lp + g_h (log p_j + H)) / T, plus g_lp / T at the target column.
    """
    # (x - M) - log Z, as log_softmax does: x - (M + log Z) would lose bits of log Z when |M| >> 1.
    log_p = _scaled_fp32(chunk, temperature).sub_(global_max[:, None]).sub_(log_z[:, None])
    # fp32 logits: exponentiate straight into the output (one chunk buffer less, no copy)
    in_place = out.dtype == torch.float32
    p = torch.exp(log_p, out=out) if in_place else torch.exp(log_p)
    if ng_h is None:
        p.mul_(ng_lp[:, None])
    else:
        coef = log_p.add_(entropy[:, None]).mul_(ng_h[:, None])
        if ng_lp is not None:
            coef.add_(ng_lp[:, None])
        p.mul_(coef)
    if ng_lp is not None:  # on the rank owning the target column
        p.scatter_add_(1, local_t[:, None], (ng_lp * -own)[:, None])
    if not in_place:
        out.copy_(p)


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    """Inputs are prepared by `logprob_and_entropy`: local target column, ownership and mask per token."""

    @staticmethod
    def forward(ctx, logits, local_targets, owned, active, group, world, temperature, chunk, entropy_grad):
        order = _token_order(logits)
        flat = _flat_logits(logits, order)
        local_t, own, act = (_flat_tokens(t, order) for t in (local_targets, owned, active))
        n = flat.shape[0]
        local_max = torch.empty(n, dtype=torch.float32, device=flat.device)
        # columns: sum e^d, sum e^d d (d = x - local max), target logit x_t (0 where another rank owns it)
        sums = torch.empty(n, 3, dtype=torch.float32, device=flat.device)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            _chunk_statistics(flat[rows], local_t[rows], temperature, local_max[rows], sums[rows])
        sums[:, 2].mul_(own)

        global_max = local_max.clone()
        if world > 1:
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        # Move local sums from the local max m_r to the global max M:
        #   sum_j e^(x_j-M) (x_j-M) = e^(m_r-M) * [sum e^d d + (m_r-M) sum e^d]
        shift = local_max - global_max
        scale = torch.exp(shift)
        sums[:, 1].add_(shift * sums[:, 0]).mul_(scale)
        sums[:, 0].mul_(scale)
        if world > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        sum_exp, sum_exp_d, target_x = sums.unbind(1)
        log_z = torch.log(sum_exp)
        # H = log Z - sum_j p_j (x_j - M): both terms are >= 0, so nothing cancels.
        entropy = torch.where(act, log_z - sum_exp_d / sum_exp, 0.0)
        logp = torch.where(act, (target_x - global_max) - log_z, 0.0)

        ctx.save_for_backward(logits, local_targets, owned, active, global_max, log_z, entropy)
        ctx.order, ctx.temperature, ctx.chunk, ctx.entropy_grad = order, temperature, chunk, entropy_grad
        ctx.set_materialize_grads(False)
        lead = logits.shape[:-1]
        out_logp = _unflat_tokens(logp, lead, order)
        out_entropy = _unflat_tokens(entropy, lead, order)
        if not entropy_grad:
            ctx.mark_non_differentiable(out_entropy)
        return out_logp, out_entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        logits, local_targets, owned, active, global_max, log_z, entropy = ctx.saved_tensors
        if not ctx.entropy_grad:
            grad_entropy = None
        if grad_logp is None and grad_entropy is None:
            return (None,) * 9
        order, temperature, chunk = ctx.order, ctx.temperature, ctx.chunk
        flat = _flat_logits(logits, order)
        local_t, own, act = (_flat_tokens(t, order) for t in (local_targets, owned, active))

        def neg_upstream(grad):  # -grad / T in fp32 per token, zero at masked tokens
            if grad is None:
                return None
            return torch.where(act, _flat_tokens(grad.to(torch.float32), order), 0.0) / -temperature

        ng_lp, ng_h = neg_upstream(grad_logp), neg_upstream(grad_entropy)
        grad_flat = torch.empty(flat.shape, dtype=logits.dtype, device=logits.device)
        n = flat.shape[0]
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            _chunk_grad(flat[rows], local_t[rows], own[rows], temperature, global_max[rows], log_z[rows],
                        entropy[rows], None if ng_lp is None else ng_lp[rows],
                        None if ng_h is None else ng_h[rows], grad_flat[rows])
        permuted_shape = [logits.shape[d] for d in order] + [logits.shape[-1]]
        inverse = [order.index(d) for d in range(len(order))] + [logits.dim() - 1]
        return (grad_flat.view(permuted_shape).permute(inverse),) + (None,) * 8


def logprob_and_entropy(
    logits_shard: torch.Tensor,
    target_ids: torch.Tensor,
    tp_group=None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    entropy_grad: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of `target_ids` and entropy of softmax(logits / temperature), per token.

    Args:
        logits_shard: `[..., V/TP]` logits for this rank's vocabulary slice (any float dtype;
            math runs in fp32). Not modified. -inf entries are allowed as long as every token has a
            finite logit somewhere in the group.
        target_ids: `[...]` integer ids in the *global* vocabulary `[0, V)`.
        tp_group: process group sharding the vocabulary; None = megatron's TP group when model
            parallelism is initialised, else a single rank holding the whole vocabulary.
        temperature: logits are divided by it exactly as a sampler does (z / T), in fp32.
        chunk_size: tokens per working chunk; None picks one from `DEFAULT_CHUNK_BYTES`.
        entropy_grad: when False the entropy is returned detached (its backward costs nothing);
            when True it carries the exact gradient dH/dz_j = -p_j (log p_j + H) / T.
        mask: optional bool `[...]`; False positions (padding, prompt) may hold any target id
            (e.g. -100) and get logp = 0, entropy = 0 and zero gradient.

    Returns:
        `(logp, entropy)`, both fp32 with `target_ids`' shape.

    Raises:
        ValueError naming the argument: shape mismatches, non-integer targets, temperature <= 0,
        a group this rank is not in, or an unmasked target outside `[0, V)` (checked with one
        host sync; every rank sees the same targets, so every rank raises and none hangs).
    """
    if logits_shard.dim() < 1 or not logits_shard.is_floating_point():
        raise ValueError(f"logits_shard: expected a floating tensor [..., V_shard], got "
                         f"{tuple(logits_shard.shape)} {logits_shard.dtype}")
    if tuple(target_ids.shape) != tuple(logits_shard.shape[:-1]):
        raise ValueError(f"target_ids: shape {tuple(target_ids.shape)} must equal logits_shard's leading "
                         f"shape {tuple(logits_shard.shape[:-1])}")
    if target_ids.is_floating_point() or target_ids.dtype == torch.bool or target_ids.is_complex():
        raise ValueError(f"target_ids: expected an integer tensor, got {target_ids.dtype}")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: must be a positive int or None, got {chunk_size!r}")
    device = logits_shard.device
    if mask is None:
        active = torch.ones(target_ids.shape, dtype=torch.bool, device=device)
    else:
        if tuple(mask.shape) != tuple(target_ids.shape):
            raise ValueError(f"mask: shape {tuple(mask.shape)} must equal target_ids' shape "
                             f"{tuple(target_ids.shape)}")
        active = mask.to(device=device, dtype=torch.bool)

    group = resolve_tp_group(tp_group)
    rank, world = _group_rank_and_size(group)
    vocab_shard = logits_shard.shape[-1]
    first, last = _vocab_range(vocab_shard, rank, world)
    vocab = vocab_shard * world

    targets = target_ids.to(device=device, dtype=torch.long)
    bad = active & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):  # one host sync; a wrong id would otherwise silently read another token
        example = int(targets[bad][0])
        raise ValueError(f"target_ids: {int(bad.sum())} unmasked id(s) outside the vocabulary [0, {vocab}) "
                         f"(e.g. {example}); mask padding positions with `mask` instead")
    owned = active & (targets >= first) & (targets < last)
    local_targets = torch.where(owned, targets - first, 0)
    chunk = chunk_size or default_chunk_size(vocab_shard)
    return _VocabParallelLogprobEntropy.apply(
        logits_shard, local_targets, owned.to(torch.float32), active, group, world,
        float(temperature), chunk, bool(entropy_grad))
