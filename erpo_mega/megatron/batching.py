"""Turn one rollout step into packed, data-parallel micro-batches, and map results back.

Layout contract. The trainer hands over a `PolicyBatch` in [sample, token] layout: row i is
sample i, column t is response token t (T = longest response). Every per-token input
(advantages, old/ref/rollout log-probs, loss mask) and every per-token output (log-probs,
entropies) uses that layout, so nothing outside this module sees packing.

Packing. Sample i is fed as `prompt + response[:-1]` (the last response token predicts
nothing we need) and the model's prediction at input position p scores token p + 1.
Several samples share one row up to a token budget: positions restart at 0 per sample and
a block-diagonal causal mask keeps samples from attending to each other, so a packed
sample computes what it would compute alone (RoPE in megatron's local attention uses the
row offset, but RoPE scores depend only on relative offsets, so this is equal up to
rounding; tested). A sample is never split, which keeps per-sequence loss aggregations
exact. Bins are filled first-fit-decreasing; each micro-batch has its own length (at PP > 1
too: the model config sets megatron's variable_seq_lengths), so the only padding is the
rounding to `pad_multiple`.

Data parallelism. Samples go to DP ranks by token-balanced greedy assignment (longest
first, to the least-loaded rank, ties to the lower rank): deterministic, so every TP/PP
rank of one replica builds the same micro-batches from the same full batch. Loss
normalisers are counted on the whole batch before the split (`global_normalizer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from erpo_mega.algo.loss import LossNormalizer

PER_TOKEN_FIELDS = ("advantages", "old_logp", "ref_logp", "rollout_logp")


@dataclass
class PolicyBatch:
    """One rollout step's samples; per-token tensors are [N, T] over response tokens.

    `loss_mask` defaults to every response token; pass it to drop tokens (e.g. truncated
    responses) from the loss. Advantages must be computed on the whole batch before it is
    split (ERPO's group statistics), which is why they are an input here.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    advantages: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    rollout_logp: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.prompt_ids = [_as_int_list(p, f"prompt_ids[{i}]") for i, p in enumerate(self.prompt_ids)]
        self.response_ids = [_as_int_list(r, f"response_ids[{i}]") for i, r in enumerate(self.response_ids)]
        if len(self.prompt_ids) != len(self.response_ids):
            raise ValueError(f"prompt_ids: {len(self.prompt_ids)} samples but response_ids has "
                             f"{len(self.response_ids)}")
        if not self.prompt_ids:
            raise ValueError("prompt_ids: the batch is empty")
        for i, p in enumerate(self.prompt_ids):
            if not p:
                raise ValueError(f"prompt_ids[{i}]: empty prompt (the first response token needs a context)")
        shape = (self.num_samples, self.max_response_len)
        for name in (*PER_TOKEN_FIELDS, "loss_mask"):
            t = getattr(self, name)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected shape {shape} ([samples, longest response]), got {got}")
        if self.loss_mask is not None:
            self.loss_mask = self.loss_mask.bool()
            if (self.loss_mask & ~self.response_mask()).any():
                raise ValueError("loss_mask: marks positions beyond a response's length")

    @property
    def num_samples(self) -> int:
        return len(self.prompt_ids)

    @property
    def max_response_len(self) -> int:
        return max(len(r) for r in self.response_ids)

    def response_lengths(self) -> list[int]:
        return [len(r) for r in self.response_ids]

    def response_mask(self) -> torch.Tensor:
        """[N, T] True on real response tokens."""
        lengths = torch.tensor(self.response_lengths())
        return torch.arange(self.max_response_len)[None, :] < lengths[:, None]

    def effective_loss_mask(self) -> torch.Tensor:
        return self.loss_mask if self.loss_mask is not None else self.response_mask()

    def input_lengths(self) -> list[int]:
        """Tokens each sample occupies in a packed row: prompt + response minus the last token."""
        return [len(p) + len(r) - 1 if r else 0 for p, r in zip(self.prompt_ids, self.response_ids)]


def _as_int_list(x, name: str) -> list[int]:
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    try:
        out = [int(v) for v in x]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a sequence of token ids") from None
    if any(v < 0 for v in out):
        raise ValueError(f"{name}: negative token id")
    return out


def global_normalizer(batch: PolicyBatch) -> LossNormalizer:
    """Loss normalisers of the whole step, counted before any DP / micro-batch split."""
    m = batch.effective_loss_mask()
    num_tokens, num_seqs = float(m.sum()), float(m.any(dim=1).sum())
    if num_tokens == 0:
        raise ValueError("loss_mask: the batch has no token that counts in the loss")
    return LossNormalizer(num_tokens=num_tokens, num_seqs=num_seqs)


def split_for_data_parallel(lengths: list[int], dp_size: int) -> list[list[int]]:
    """Sample indices per DP rank, balancing tokens; deterministic; each list sorted."""
    if dp_size < 1:
        raise ValueError(f"dp_size: must be >= 1, got {dp_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    load = [0] * dp_size
    parts: list[list[int]] = [[] for _ in range(dp_size)]
    for i in order:
        rank = min(range(dp_size), key=lambda r: (load[r], len(parts[r]), r))
        parts[rank].append(i)
        load[rank] += lengths[i]
    return [sorted(p) for p in parts]


def pack_sequences(lengths: dict[int, int] | list[int], budget: int, max_per_bin: int | None = None
                   ) -> list[list[int]]:
    """First-fit-decreasing bins of sample indices whose lengths sum to at most `budget`.

    `lengths` maps sample index -> tokens (a list means indices 0..n-1). Zero-length samples
    are left out (nothing to compute). `max_per_bin=1` disables packing (attention kernels
    that cannot take a block-diagonal mask). Bins and contents are in a deterministic order.
    """
    if isinstance(lengths, list):
        lengths = dict(enumerate(lengths))
    if budget < 1:
        raise ValueError(f"micro_batch_tokens: must be >= 1, got {budget}")
    for i, n in lengths.items():
        if n > budget:
            raise ValueError(f"micro_batch_tokens: sample {i} needs {n} tokens (prompt + response - 1) but the "
                             f"budget is {budget}; raise micro_batch_tokens")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted((i for i, n in lengths.items() if n > 0), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free and (max_per_bin is None or len(bins[b]) < max_per_bin):
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return [sorted(b) for b in bins]


@dataclass
class MicroBatch:
    """One packed row [1, S] and the maps between it and its samples' [n, T_mb] layout.

    `gather_pos[j, t]` is the row position whose prediction scores response token t of
    local sample j (valid where `valid[j, t]`); `samples[j]` is that sample's batch index.
    """

    input_ids: torch.Tensor  # [1, S] long
    position_ids: torch.Tensor  # [1, S] long, restarting at 0 per sample
    target_ids: torch.Tensor  # [1, S] long, next token at each position
    segment_ids: torch.Tensor  # [1, S] long: packed sample of each position (padding: its own)
    samples: list[int]
    gather_pos: torch.Tensor  # [n, T_mb] long
    valid: torch.Tensor  # [n, T_mb] bool, real response tokens
    loss_mask: torch.Tensor  # [n, T_mb] bool
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)  # advantages, old_logp, ... [n, T_mb]
    seg_lengths: list[int] = field(default_factory=list)  # tokens of each packed sample, then padding

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def attention_mask(self) -> torch.Tensor:
        """Dense [1, 1, S, S] bool block-causal mask, True = masked (megatron's convention);
        built on demand, for core attentions that need it (plain DotProductAttention)."""
        return block_causal_mask(self.segment_ids[0])

    def segment_mask(self) -> torch.Tensor:
        """The compact [1, 1, 1, S] int32 form `ChunkedDotProductAttention` takes in place of
        `attention_mask` (see models/chunked_attention.py): no S x S tensor."""
        return self.segment_ids.to(torch.int32)[:, None, None, :]

    def to(self, device) -> MicroBatch:
        move = {k: v.to(device) for k, v in self.per_token.items()}
        return MicroBatch(self.input_ids.to(device), self.position_ids.to(device), self.target_ids.to(device),
                          self.segment_ids.to(device), list(self.samples), self.gather_pos.to(device),
                          self.valid.to(device), self.loss_mask.to(device), move, list(self.seg_lengths))

    def thd_params(self):
        """TransformerEngine's packed-sequence (THD) description of this row: one sequence per
        packed sample (and one for the padding), by cumulative lengths; replaces the mask."""
        from megatron.core.packed_seq_params import PackedSeqParams

        lengths = self.seg_lengths or [self.num_tokens]
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        cu = cu.to(self.input_ids.device)
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                               max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))

    def unpack(self, row_values: torch.Tensor) -> torch.Tensor:
        """[1, S] (or [S]) per-position values -> [n, T_mb], zero where not a response token."""
        flat = row_values.reshape(-1)
        out = flat[self.gather_pos]
        return torch.where(self.valid, out, torch.zeros((), dtype=out.dtype, device=out.device))

    def scatter_into(self, dest: torch.Tensor, values: torch.Tensor) -> None:
        """Write [n, T_mb] values into a batch-layout [N, T] tensor at this micro-batch's samples."""
        t_mb = values.shape[1]
        idx = torch.tensor(self.samples, device=dest.device)
        dest[idx, :t_mb] = torch.where(self.valid, values, dest[idx, :t_mb]).to(dest.dtype)


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[S] segment ids -> [1, 1, S, S] bool, True where query i may NOT attend key j."""
    s = segment_ids.numel()
    same = segment_ids[:, None] == segment_ids[None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return ~(same & causal)[None, None]


def build_micro_batch(batch: PolicyBatch, samples: list[int], pad_to: int | None = None,
                      pad_token_id: int = 0) -> MicroBatch:
    """Pack `samples` (their order kept) into one row, padded to `pad_to` tokens if given."""
    ids, pos, tgt, seg = [], [], [], []
    gather_rows = []
    for j, i in enumerate(samples):
        full = batch.prompt_ids[i] + batch.response_ids[i]
        start = len(ids)
        n_in = len(full) - 1
        ids.extend(full[:-1])
        tgt.extend(full[1:])
        pos.extend(range(n_in))
        seg.extend([j] * n_in)
        first = start + len(batch.prompt_ids[i]) - 1  # predicts response token 0
        gather_rows.append(list(range(first, first + len(batch.response_ids[i]))))
    used = len(ids)
    if pad_to is not None:
        if pad_to < used:
            raise ValueError(f"pad_to: {pad_to} is shorter than the packed row ({used} tokens)")
        n_pad = pad_to - used
        ids.extend([pad_token_id] * n_pad)
        tgt.extend([pad_token_id] * n_pad)
        pos.extend(range(n_pad))
        seg.extend([len(samples)] * n_pad)  # padding is its own segment: attends only to itself
    t_mb = max(len(g) for g in gather_rows)
    gather_pos = torch.zeros(len(samples), t_mb, dtype=torch.long)
    valid = torch.zeros(len(samples), t_mb, dtype=torch.bool)
    for j, g in enumerate(gather_rows):
        gather_pos[j, :len(g)] = torch.tensor(g, dtype=torch.long)
        valid[j, :len(g)] = True
    idx = torch.tensor(samples)
    loss_mask = batch.effective_loss_mask()[idx, :t_mb] & valid
    per_token = {}
    for name in PER_TOKEN_FIELDS:
        t = getattr(batch, name)
        if t is not None:
            per_token[name] = t[idx, :t_mb]
    return MicroBatch(
        input_ids=torch.tensor(ids, dtype=torch.long)[None],
        position_ids=torch.tensor(pos, dtype=torch.long)[None],
        target_ids=torch.tensor(tgt, dtype=torch.long)[None],
        segment_ids=torch.tensor(seg, dtype=torch.long)[None],
        samples=list(samples), gather_pos=gather_pos, valid=valid, loss_mask=loss_mask, per_token=per_token,
        seg_lengths=[n for n in torch.bincount(torch.tensor(seg)).tolist() if n],
    )


def _round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def plan_micro_batches(batch: PolicyBatch, dp_rank: int, dp_size: int, micro_batch_tokens: int,
                       uniform_length: bool = False, pad_multiple: int = 1, pad_token_id: int = 0,
                       pack: bool = True) -> list[MicroBatch]:
    """This DP rank's packed micro-batches.

    `uniform_length=True` pads every micro-batch to the longest one of this rank, for a
    pipeline schedule that sends fixed-shape activations; the policy's own model config sets
    megatron's `variable_seq_lengths` under PP instead, so it does not. Raises if this rank gets no
    samples: a step needs at least as many non-empty samples as DP ranks.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank: {dp_rank} is not in [0, {dp_size})")
    lengths = batch.input_lengths()
    parts = split_for_data_parallel(lengths, dp_size)
    mine = {i: lengths[i] for i in parts[dp_rank]}
    bins = pack_sequences(mine, micro_batch_tokens, max_per_bin=None if pack else 1)
    if not bins:
        raise ValueError(f"batch: data-parallel rank {dp_rank} of {dp_size} got no non-empty sample "
                         f"({batch.num_samples} samples in the step); use at least {dp_size} samples")
    used = [sum(mine[i] for i in b) for b in bins]
    if uniform_length:
        width = _round_up(max(used), pad_multiple)
        return [build_micro_batch(batch, b, pad_to=width, pad_token_id=pad_token_id) for b in bins]
    return [build_micro_batch(batch, b, pad_to=_round_up(u, pad_multiple), pad_token_id=pad_token_id)
            for b, u in zip(bins, used)]
