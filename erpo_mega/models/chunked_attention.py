"""megatron's local core attention, computed in query chunks so long packed rows fit.

The local layer spec packs several samples into one row with an explicit block-diagonal
causal mask (see megatron/batching.py). megatron's `DotProductAttention` materialises the
full [b, heads, S, S] score and probability tensors and keeps the probabilities for
backward, so memory grows with S^2 per head: at S = 16384 and 28 heads that is tens of GiB
per layer, which is what bounded `micro_batch_tokens`. This subclass computes the same math
one query chunk at a time (keys up to the chunk's end only: the mask is causal) under
activation checkpointing, so the forward holds one chunk's scores and the backward
recomputes them chunk by chunk: O(C x S) per head instead of O(S^2).

No S x S mask either. The schedule passes a *segment mask* (`segment_mask`): the packed
row's segment ids as an int32 [b, 1, 1, S] tensor in place of the bool [b, 1, S, S] mask
(megatron hands `attention_mask` through to core attention untouched). Each query chunk
builds its own [b, 1, C, E] block-causal mask from it: (same segment) and (key <= query).
A dense bool mask still works as before.

Same semantics as megatron's unfused path: scores scaled by `softmax_scale`, masked entries
filled with -10000, softmax in fp32 when `attention_softmax_in_fp32`, GQA by repeating KV
heads. Anything this path does not cover (dropout in training, attention bias, packed-sequence
params, learnable softmax offsets, short rows) goes to megatron's own forward, with a segment
mask first expanded to the dense mask megatron expects (S x S only on that fallback).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 2048
MASK_FILL = -10000.0  # megatron's attention_mask_func


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[S] or [b, S] segment ids of a packed row -> the compact mask [b, 1, 1, S] int32 that
    `ChunkedDotProductAttention` accepts instead of a dense [b, 1, S, S] bool mask."""
    seg = segment_ids.reshape(-1, segment_ids.shape[-1])
    return seg.to(torch.int32)[:, None, None, :]


def is_segment_mask(mask) -> bool:
    return isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.dtype == torch.int32 and mask.size(2) == 1


def block_causal_from_segments(seg_q: torch.Tensor, seg_k: torch.Tensor, q_start: int) -> torch.Tensor:
    """Segment ids of queries [b, 1, 1, C] (row positions q_start..) and keys [b, 1, 1, E]
    (positions 0..) -> bool [b, 1, C, E], True where the query may NOT attend the key."""
    c, e = seg_q.size(-1), seg_k.size(-1)
    qpos = torch.arange(q_start, q_start + c, device=seg_q.device)[:, None]
    kpos = torch.arange(e, device=seg_k.device)[None, :]
    same = seg_q.transpose(-1, -2) == seg_k  # [b, 1, C, E]
    return ~(same & (kpos <= qpos))


def dense_mask(mask: torch.Tensor) -> torch.Tensor:
    """A segment mask expanded to megatron's [b, 1, S, S] bool mask (fallback path only)."""
    return block_causal_from_segments(mask, mask, 0) if is_segment_mask(mask) else mask


def _chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           softmax_fp32: bool, q_start: int = 0) -> torch.Tensor:
    """q [b, h, C, d], k/v [b, h, E, d], mask [b|1, 1, C, E] (True = masked) or a segment mask
    [b, 1, 1, S] (this chunk's [b, 1, C, E] mask built here, so checkpointing recomputes it
    instead of keeping it) -> [b, h, C, d]."""
    if is_segment_mask(mask):
        c, e = q.size(-2), k.size(-2)
        mask = block_causal_from_segments(mask[..., q_start:q_start + c], mask[..., :e], q_start)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(mask, MASK_FILL)
    dtype = scores.dtype
    probs = torch.softmax(scores.float() if softmax_fp32 else scores, dim=-1).to(dtype)
    return torch.matmul(probs, v)


class ChunkedDotProductAttention(DotProductAttention):
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def _covered(self, query, attention_mask, attention_bias, packed_seq_params) -> bool:
        dense = attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.dim() == 4
        return ((dense or is_segment_mask(attention_mask))
                and query.size(0) > self.chunk_tokens and attention_bias is None and packed_seq_params is None
                and getattr(self, "softmax_offset", None) is None
                and not (self.training and self.config.attention_dropout > 0)
                and getattr(self.scale_mask_softmax, "scale", None) is None)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if not self._covered(query, attention_mask, attention_bias, packed_seq_params):
            if is_segment_mask(attention_mask):
                attention_mask = dense_mask(attention_mask)
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        sq, b, heads, d = query.shape
        q = query.permute(1, 2, 0, 3)  # [b, h, S, d]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        softmax_fp32 = bool(getattr(self.scale_mask_softmax, "softmax_in_fp32", False))
        scale = float(self.softmax_scale)
        outs = []
        for s in range(0, sq, self.chunk_tokens):
            e = min(sq, s + self.chunk_tokens)
            mask = attention_mask if is_segment_mask(attention_mask) else attention_mask[..., s:e, :e]
            args = (q[:, :, s:e], k[:, :, :e], v[:, :, :e], mask)
            if torch.is_grad_enabled():
                outs.append(checkpoint(_chunk, *args, scale, softmax_fp32, s, use_reentrant=False))
            else:
                outs.append(_chunk(*args, scale, softmax_fp32, s))
        context = torch.cat(outs, dim=2)  # [b, h, S, d]
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * d)
