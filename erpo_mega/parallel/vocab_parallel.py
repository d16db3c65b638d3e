"""Per-token log-probability and entropy from vocabulary-sharded logits, without gathering the vocab.

Under tensor parallelism each rank holds logits for a vocabulary slice `[..., V/TP]` (megatron's
sharding: rank r owns ids [r*V/TP, (r+1)*V/TP)). Gathering the full vocabulary in fp32 for every
response token (152k entries for Qwen) is what runs trainers out of memory, so this module
reduces per-token *scalars* across the TP group instead:

    forward:  per token and rank, local max m, log of the local normaliser, the mean of d = x - m
              under the local softmax, and the target logit -> two all-reduces ([tokens] MAX,
              [tokens, 3] SUM, fp32) per call, not per chunk;
    backward: no communication (global max, log-normaliser, entropy and each rank's share of the
              probability mass are saved per token).

    with x = z / T,  M = max_j x_j,  Z = sum_j e^(x_j - M):
    logp_t = (x_t - M) - log Z           H = log Z - sum_j p_j (x_j - M)   (two terms >= 0)
    dlogp_t/dz_j = (1[j=t] - p_j) / T    dH/dz_j = -p_j (log p_j + H) / T

Speed. The function is memory-bound: its cost is the number of sweeps over the `[tokens, V/TP]`
fp32 logits. fp32 logits on the CPU go to compiled kernels (`erpo_mega/native/src/logprob_entropy.c`,
built on first use; `ERPO_NATIVE=0` or no compiler -> the torch path below): forward reads each row
once (online softmax, double accumulation), backward reads it once more and writes the gradient,
3 passes in all, rows split over `torch.get_num_threads()` threads. With `inplace_grad=True` the
gradient overwrites the logits (no gradient-sized allocation, no first-touch page faults); the
train step uses that. The torch path (CUDA, bf16, no compiler) processes tokens in chunks small
enough to stay in the CPU's cache (`default_chunk_size`), so each chunk is read from memory once and the few elementwise steps
after the first one (subtract the max, one fused softmax, a multiply, row sums) run on cached
data. Passes over main memory, per call:

    softmax kept (fp32 logits, fits `save_bytes`):  forward reads x, writes p;   backward reads
        p and writes the gradient into the same buffer (+ reads x again for the entropy gradient);
    recomputed (otherwise):                         forward reads x;             backward reads x
        and writes the gradient.

Keeping the softmax (torch path only) costs no extra peak memory for fp32 logits (its buffer
becomes the gradient, which autograd needs anyway) but holds `tokens * V/TP * 4` bytes from forward to
backward, hence the byte budget; recomputing costs one more exp per element in backward. Extra
working memory beyond that is two fp32 `[chunk, V/TP]` buffers. The caller's logits are only
written to with `inplace_grad=True` (megatron's `vocab_parallel_cross_entropy` always writes to
them). Results are fp32 whatever the logits dtype.
"""

from __future__ import annotations

import ctypes
import math
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from erpo_mega.native import address as _ptr

DEFAULT_CHUNK_BYTES = 256 * 2**20
"""Working-memory budget per chunk on accelerators (two fp32 `[chunk, V/TP]` buffers): few, large
chunks, since every elementwise step is a kernel launch there."""

CPU_CHUNK_BYTES = 4 * 2**20
"""Working-memory budget per chunk on the CPU: small enough that a chunk stays in the L2/L3 cache
between the steps that sweep it (measured best around 2 MiB a buffer on a 1 MiB-L2 core; larger
chunks spill to memory, much smaller ones pay per-op dispatch)."""

DEFAULT_SAVE_BYTES = 512 * 2**20
"""Largest fp32 softmax (`tokens * V/TP * 4` bytes) kept from forward to backward by default."""

_WORKING_BUFFERS = 2
# Logits of -inf (masked vocab entries) are floored here where a product with a zero
# probability would otherwise be NaN; any real logit is far above it, so no probability changes.
_NEG_FLOOR = -1e30


def default_chunk_size(vocab_shard: int, budget_bytes: int | None = None,
                       device: torch.device | str | None = None) -> int:
    """Tokens per chunk so that the fp32 working buffers fit in `budget_bytes`.

    `budget_bytes=None` picks by device: `CPU_CHUNK_BYTES` on the CPU (cache-sized), else
    `DEFAULT_CHUNK_BYTES`.
    """
    if budget_bytes is None:
        on_cpu = device is None or torch.device(device).type == "cpu"
        budget_bytes = CPU_CHUNK_BYTES if on_cpu else DEFAULT_CHUNK_BYTES
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


def _shifted(chunk: torch.Tensor, row_max: torch.Tensor, temperature: float, out: torch.Tensor,
             floor: bool) -> torch.Tensor:
    """`out = (chunk - row_max) / T` in fp32 (max 0 per row); with `floor`, -inf becomes `_NEG_FLOOR`.

    Subtracting the raw max before dividing keeps the shifted values exact near the max, where
    the probability mass is, however large the logits.
    """
    d = torch.sub(chunk, row_max[:, None], out=out)
    if temperature != 1.0:
        d.div_(temperature)
    return d.clamp_(min=_NEG_FLOOR) if floor else d


def _chunk_statistics(chunk: torch.Tensor, row_max: torch.Tensor, temperature: float, floor: bool,
                      d_buf: torch.Tensor, p_out: torch.Tensor, stats_out: torch.Tensor) -> None:
    """Fused softmax of one chunk into `p_out`; per token max(p), sum(p), sum(p d) into `stats_out`.

    d = (x - m) / T has max exactly 0, so the softmax's largest entry is 1/Z' for the normaliser Z'
    the kernel used. That kernel sums the exps in one running fp32 sum per row (relative error
    growing with V, ~4e-6 at 65k entries), so its p is off by a common factor; `sum(p)` (ATen's
    cascaded sum, accurate to ~1e-7) measures that factor: Z = Z' sum(p), p_true = p / sum(p).
    Where d = -inf the probability is 0 and the product is NaN, which `nansum` skips (a NaN
    logit still surfaces through max(p)).
    """
    d = _shifted(chunk, row_max, temperature, d_buf, floor)
    torch.softmax(d, 1, out=p_out)
    torch.amax(p_out, 1, out=stats_out[:, 0])
    torch.sum(p_out, 1, out=stats_out[:, 1])
    torch.nansum(d.mul_(p_out), 1, out=stats_out[:, 2])


def _local_statistics(flat: torch.Tensor, temperature: float, chunk: int, keep: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token on this rank: raw local max m (floored), log Z_local of d, mean of d under the local
    softmax, and sum(p) of the kernel's softmax p (p_true = p / sum(p); see `_chunk_statistics`).

    `keep`: fp32 `[tokens, V_shard]` buffer that receives the kernel's p for backward, or None.
    One read of each chunk from memory; the remaining sweeps hit the cache (see module doc).
    """
    n, vs = flat.shape
    f32 = {"dtype": torch.float32, "device": flat.device}
    row_max = torch.empty(n, **f32)
    stats = torch.empty(n, 3, **f32)  # max(p), sum(p), sum(p d)
    rows = max(1, min(chunk, n))
    d_buf = torch.empty(rows, vs, **f32)
    p_buf = torch.empty(rows, vs, **f32) if keep is None else None
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        m = row_max[start:end]
        m.copy_(flat[start:end].amax(dim=1)).clamp_(min=_NEG_FLOOR)
        p_out = keep[start:end] if keep is not None else p_buf[:end - start]
        _chunk_statistics(flat[start:end], m, temperature, False, d_buf[:end - start], p_out, stats[start:end])
    del d_buf, p_buf
    bad = ~torch.isfinite(stats).all(dim=1)
    if bool(bad.any()):  # one host sync per call; rare: a token whose whole shard is -inf (or NaN)
        _fix_rows(flat, temperature, chunk, bad.nonzero().squeeze(1), row_max, stats, keep)
    p_max, p_sum, p_d = stats.unbind(1)
    log_z = p_sum.log() - p_max.log()
    return row_max, log_z, p_d / p_sum, p_sum


# ---------------------------------------------------------------- native CPU kernels

_NATIVE_CFLAGS = ("-ffp-contract=fast",)  # FMA in the polynomial of the kernel's exp
_NATIVE_MIN_ROW_ELEMENTS = 2**20  # below this many logits a call stays on one thread
_HUGEPAGE_MIN_BYTES = 16 * 2**20  # fresh gradient buffers this large get madvise(MADV_HUGEPAGE)
_native_lock = threading.Lock()
_native_ready: dict[int, ctypes.CDLL] = {}
_pool: ThreadPoolExecutor | None = None


def _native_kernels() -> ctypes.CDLL | None:
    """`erpo_mega/native/src/logprob_entropy.c` built and typed, or None (then the torch path runs).

    `ERPO_NATIVE=0` is honoured at every call (`load_library` checks it first), so tests can
    compare both paths in one process.
    """
    from erpo_mega.native import load_library

    lib = load_library("logprob_entropy", extra_cflags=_NATIVE_CFLAGS)
    if lib is None:
        return None
    with _native_lock:
        if id(lib) not in _native_ready:
            p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
            lib.erpo_lpe_forward.argtypes = [p, i64, i64, i64, f32, p, p, p]
            lib.erpo_lpe_forward.restype = None
            lib.erpo_lpe_backward.argtypes = [p, p, i64, i64, i64, i64, f32, p, p, p, p, p, p]
            lib.erpo_lpe_backward.restype = None
            lib.erpo_lpe_advise_hugepages.argtypes = [p, i64]
            lib.erpo_lpe_advise_hugepages.restype = ctypes.c_int
            _native_ready[id(lib)] = lib
    return lib


def _native_for(flat: torch.Tensor) -> ctypes.CDLL | None:
    """The kernels when they can read `flat` directly: fp32 CPU rows of unit stride."""
    if flat.device.type != "cpu" or flat.dtype != torch.float32 or (flat.shape[1] > 1 and flat.stride(1) != 1):
        return None
    return _native_kernels()


def _over_rows(fn, n: int, vs: int) -> None:
    """`fn(first, end)` over `torch.get_num_threads()` contiguous row ranges (ctypes drops the GIL)."""
    global _pool
    threads = min(torch.get_num_threads(), n)
    if threads <= 1 or n * vs < _NATIVE_MIN_ROW_ELEMENTS:
        if n:
            fn(0, n)
        return
    with _native_lock:
        if _pool is None or _pool._max_workers < threads:
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="erpo-lpe")
        pool = _pool
    bounds = [n * k // threads for k in range(threads + 1)]
    for f in [pool.submit(fn, a, b) for a, b in zip(bounds, bounds[1:])]:
        f.result()


def _native_statistics(lib, flat: torch.Tensor, temperature: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_local_statistics` in one read of the logits (online softmax in C, double accumulation);
    the kernel's normaliser is exact, so the returned softmax-sum correction is 1."""
    n, vs = flat.shape
    row_max = torch.empty(n, dtype=torch.float32)
    sums = torch.empty(2, n, dtype=torch.float64)  # sum e^d, sum e^d d
    s, sd = sums[0], sums[1]
    ld, inv_t = flat.stride(0), 1.0 / temperature

    def rows(a: int, b: int) -> None:
        lib.erpo_lpe_forward(_ptr(flat, a), b - a, vs, ld, inv_t, _ptr(row_max, a), _ptr(s, a), _ptr(sd, a))

    _over_rows(rows, n, vs)
    return row_max, s.log().float(), (sd / s).float(), torch.ones(n, dtype=torch.float32)


def _native_gradient(lib, flat: torch.Tensor, out: torch.Tensor, temperature: float, row_max: torch.Tensor,
                     log_p_offset: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor | None,
                     local_t: torch.Tensor, at_target: torch.Tensor) -> None:
    """out_j = exp(d_j + offset) (alpha + beta d_j) [+ at_target at the target], d = (x - m) / T:
    one read of `flat`, one write of `out` (which may be `flat` itself)."""
    n, vs = flat.shape
    per_row = [t.contiguous() for t in (row_max, log_p_offset, alpha)]
    b = beta.contiguous() if beta is not None else None
    t_col, at = local_t.contiguous(), at_target.contiguous()
    inv_t = 1.0 / temperature

    def rows(a: int, e: int) -> None:
        lib.erpo_lpe_backward(_ptr(flat, a), _ptr(out, a), e - a, vs, flat.stride(0), out.stride(0), inv_t,
                              *(_ptr(t, a) for t in per_row), None if b is None else _ptr(b, a),
                              _ptr(t_col, a), _ptr(at, a))

    _over_rows(rows, n, vs)


def _fix_rows(flat, temperature, chunk, rows, row_max, stats, keep) -> None:
    """Redo the statistics of `rows` with -inf floored (an all -inf shard becomes uniform there; the
    global combination then gives it zero weight because its max is the floor)."""
    for start in range(0, rows.numel(), chunk):
        sel = rows[start:start + chunk]
        x = flat.index_select(0, sel)
        m = x.amax(dim=1).float().clamp_(min=_NEG_FLOOR)
        p = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        out = torch.empty(sel.numel(), 3, dtype=torch.float32, device=x.device)
        _chunk_statistics(x, m, temperature, True, torch.empty_like(p), p, out)
        row_max.index_copy_(0, sel, m)
        stats.index_copy_(0, sel, out)
        if keep is not None:
            keep.index_copy_(0, sel, p)


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    """Inputs are prepared by `logprob_and_entropy`: local target column, ownership and mask per token."""

    @staticmethod
    def forward(ctx, logits, local_targets, owned, active, group, world, temperature, chunk, entropy_grad,
                save_bytes, inplace_grad):
        order = _token_order(logits)
        flat = _flat_logits(logits, order)
        local_t, own, act = (_flat_tokens(t, order) for t in (local_targets, owned, active))
        n, vs = flat.shape
        lib = _native_for(flat)
        # In place only where `flat` is the logits' own storage (not a reshape copy) and its rows do
        # not overlap (an expanded tensor would have several rows write one address).
        inplace = (inplace_grad and ctx.needs_input_grad[0]
                   and flat.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
                   and (vs <= 1 or flat.stride(1) >= 1) and (n <= 1 or flat.stride(0) >= vs * flat.stride(1)))
        # Torch path: keep p_local for backward when it is within the byte budget and can become the
        # gradient itself (fp32 logits): no second exp sweep in backward, no extra peak memory.
        # The native kernels recompute instead (3 passes, not 4), as does the in-place mode.
        keep = None
        if (lib is None and not inplace and ctx.needs_input_grad[0] and logits.dtype == torch.float32
                and n * vs * 4 <= save_bytes):
            keep = torch.empty(n, vs, dtype=torch.float32, device=flat.device)
        if lib is not None:
            row_max, local_log_z, mean_d, p_sum = _native_statistics(lib, flat, temperature)
        else:
            row_max, local_log_z, mean_d, p_sum = _local_statistics(flat, temperature, chunk, keep)

        target_x = flat.gather(1, local_t[:, None]).squeeze(1).float()
        local_max = row_max if temperature == 1.0 else (row_max / temperature).clamp_(min=_NEG_FLOOR)
        global_max = local_max.clone()
        if world > 1:
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        # This rank's sums relative to the global max M: sum e^(x-M) = e^(m-M) Z_local and
        #   sum_j e^(x_j-M) (x_j-M) = e^(m-M) Z_local [mean_d + (m-M)]
        shift = (local_max - global_max).clamp_(min=_NEG_FLOOR)
        local_z = torch.exp(local_log_z + shift)
        if temperature != 1.0:
            target_x = target_x / temperature
        sums = torch.stack([local_z, local_z * (mean_d + shift), target_x.clamp_(min=_NEG_FLOOR) * own], dim=1)
        if world > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        sum_exp, sum_exp_d, target_x = sums.unbind(1)
        log_z = torch.log(sum_exp)
        # H = log Z - sum_j p_j (x_j - M): both terms are >= 0, so nothing cancels.
        entropy = torch.where(act, log_z - sum_exp_d / sum_exp, 0.0)
        logp = torch.where(act, (target_x - global_max) - log_z, 0.0)
        share = local_z / (sum_exp * p_sum)  # p_j = share * (the softmax kernel's p_j) on this rank
        log_p_offset = shift - log_z  # log p_j = d_j + log_p_offset

        ctx.save_for_backward(logits, local_targets, owned, active, row_max, share, log_p_offset, entropy)
        ctx.order, ctx.temperature, ctx.chunk, ctx.entropy_grad = order, temperature, chunk, entropy_grad
        ctx.kept, ctx.inplace, ctx.native = keep, inplace, lib is not None  # backward takes the same path
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
        logits, local_targets, owned, active, row_max, share, log_p_offset, entropy = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None  # consumed: a second backward (retain_graph) recomputes
        if not ctx.entropy_grad:
            grad_entropy = None
        if grad_logp is None and grad_entropy is None:
            return (None,) * 11
        order, temperature, chunk = ctx.order, ctx.temperature, ctx.chunk
        flat = _flat_logits(logits, order)
        lib = _native_for(flat) if ctx.native else None
        local_t, own, act = (_flat_tokens(t, order) for t in (local_targets, owned, active))

        def upstream(grad):  # fp32 per token, zero at masked tokens
            return torch.where(act, _flat_tokens(grad.to(torch.float32), order), 0.0)

        g_lp = upstream(grad_logp) if grad_logp is not None else torch.zeros_like(share)
        # grad_j = p_j * coef_j (+ g_lp / T at the target), and
        #   coef_j = -(g_lp + g_h (log p_j + H)) / T = alpha + beta * d_j   (log p_j = d_j + offset)
        # The torch path folds p_j = share * p_local_j into alpha and beta; the native kernel
        # computes p_j = exp(d_j + offset) itself.
        scale = (share if lib is None else torch.ones_like(share)) / -temperature
        if grad_entropy is not None:
            g_h = upstream(grad_entropy)
            beta = (scale * g_h)[:, None]
            alpha = (scale * (g_lp + g_h * (entropy + log_p_offset)))[:, None]
        else:
            coef = (scale * g_lp)[:, None]
        at_target = (g_lp * own / temperature)[:, None]
        t_col = local_t[:, None]

        n, vs = flat.shape
        if ctx.inplace:
            # The gradient overwrites the logits: any other autograd user of them that saved them
            # now fails its version check instead of reading the gradient as logits.
            torch.autograd.graph.increment_version(logits)
        if lib is not None:  # one read of x, one write of the gradient
            if ctx.inplace:
                grad_flat = flat
            else:
                grad_flat = torch.empty(n, vs, dtype=torch.float32)
                if grad_flat.nbytes >= _HUGEPAGE_MIN_BYTES:  # before the first touch
                    lib.erpo_lpe_advise_hugepages(_ptr(grad_flat), grad_flat.nbytes)
            a, b = (alpha, beta) if grad_entropy is not None else (coef, None)
            _native_gradient(lib, flat, grad_flat, temperature, row_max, log_p_offset, a.squeeze(1),
                             None if b is None else b.squeeze(1), local_t, at_target.squeeze(1))
        elif kept is not None and grad_entropy is None:  # one in-place sweep over the kept softmax
            grad_flat = kept.mul_(coef).scatter_add_(1, t_col, at_target)
        else:
            if kept is not None:
                grad_flat = kept
            elif ctx.inplace:  # each chunk's logits are read (into d) before its gradient overwrites them
                grad_flat = flat
            else:
                grad_flat = torch.empty(flat.shape, dtype=logits.dtype, device=logits.device)
            rows = max(1, min(chunk, n))
            d_buf = torch.empty(rows, vs, dtype=torch.float32, device=flat.device)
            p_buf = (torch.empty(rows, vs, dtype=torch.float32, device=flat.device)
                     if kept is None and grad_flat.dtype != torch.float32 else None)
            for start in range(0, n, chunk):
                sl, r = slice(start, min(start + chunk, n)), min(start + chunk, n) - start
                # floored: a -inf logit has p = 0, and 0 * (alpha + beta * -inf) would be NaN
                d = _shifted(flat[sl], row_max[sl], temperature, d_buf[:r], True)
                if kept is not None:
                    p = kept[sl]
                else:
                    p = torch.softmax(d, 1, out=grad_flat[sl] if p_buf is None else p_buf[:r])
                if grad_entropy is not None:
                    p.mul_(d.mul_(beta[sl]).add_(alpha[sl]))
                else:
                    p.mul_(coef[sl])
                p.scatter_add_(1, t_col[sl], at_target[sl])  # in fp32, before any rounding to bf16
                if p_buf is not None:
                    grad_flat[sl].copy_(p)
        if ctx.inplace:
            return (logits.detach(),) + (None,) * 10  # `flat` is a view of the logits' storage
        permuted_shape = [logits.shape[d] for d in order] + [logits.shape[-1]]
        inverse = [order.index(d) for d in range(len(order))] + [logits.dim() - 1]
        return (grad_flat.view(permuted_shape).permute(inverse),) + (None,) * 10


def logprob_and_entropy(
    logits_shard: torch.Tensor,
    target_ids: torch.Tensor,
    tp_group=None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    entropy_grad: bool = False,
    mask: torch.Tensor | None = None,
    save_bytes: int | None = None,
    inplace_grad: bool = False,
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
        chunk_size: tokens per working chunk; None = `default_chunk_size` for the logits' device
            (cache-sized on the CPU).
        entropy_grad: when False the entropy is returned detached (its backward costs nothing);
            when True it carries the exact gradient dH/dz_j = -p_j (log p_j + H) / T.
        mask: optional bool `[...]`; False positions (padding, prompt) may hold any target id
            (e.g. -100) and get logp = 0, entropy = 0 and zero gradient.
        save_bytes: byte budget for keeping the fp32 softmax `[tokens, V/TP]` from forward to
            backward (fp32 logits that need a gradient only: the buffer then becomes the gradient);
            above it, backward recomputes the softmax chunk by chunk. None = `DEFAULT_SAVE_BYTES`;
            0 always recomputes. The native CPU kernels (fp32) always recompute.
        inplace_grad: write the gradient into `logits_shard`'s own storage in backward instead of
            a fresh `[tokens, V/TP]` buffer (as megatron's vocab-parallel cross entropy does): no
            gradient-sized allocation and no first-touch page faults. For logits that are a
            temporary nobody reads after this call: after backward they hold the gradient. Their
            version counter is bumped, so another autograd node that saved them fails loudly
            instead of reading the gradient; a second backward through this call fails the same
            way. Ignored where the logits cannot be viewed as `[tokens, V/TP]` (a copy is made) or
            their rows overlap (an expanded tensor).

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
    if save_bytes is not None and (not isinstance(save_bytes, int) or isinstance(save_bytes, bool)
                                   or save_bytes < 0):
        raise ValueError(f"save_bytes: must be an int >= 0 or None, got {save_bytes!r}")
    if not isinstance(inplace_grad, bool):
        raise ValueError(f"inplace_grad: must be a bool, got {inplace_grad!r}")
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
    chunk = chunk_size or default_chunk_size(vocab_shard, device=device)
    return _VocabParallelLogprobEntropy.apply(
        logits_shard, local_targets, owned.to(torch.float32), active, group, world,
        float(temperature), chunk, bool(entropy_grad), DEFAULT_SAVE_BYTES if save_bytes is None else save_bytes,
        inplace_grad)
