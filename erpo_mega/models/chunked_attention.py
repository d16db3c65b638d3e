"""megatron's local core attention, computed in query chunks so long packed rows fit.

The local layer spec packs several samples into one row with an explicit block-diagonal
causal mask (see megatron/batching.py). megatron's `DotProductAttention` materialises the
full [b, heads, S, S] score and probability tensors and keeps the probabilities for
backward, so memory grows with S^2 per head: at S = 16384 and 28 heads that is tens of GiB
per layer, which is what bounded `micro_batch_tokens`. This subclass computes the same math
one query chunk at a time (keys up to the chunk's end only: the mask is causal) under
activation checkpointing, so the forward holds one chunk's scores and the backward
recomputes them chunk by chunk: O(C x S) per head instead of O(S^2). The mask (one bool
[S, S], shared by all heads and layers) is unchanged.

Same semantics as megatron's unfused path: scores scaled by `softmax_scale`, masked entries
filled with -10000, softmax in fp32 when `attention_softmax_in_fp32`, GQA by repeating KV
heads. Anything this path does not cover (dropout in training, attention bias, packed-sequence
params, learnable softmax offsets, short rows) goes to megatron's own forward.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 2048
MASK_FILL = -10000.0  # megatron's attention_mask_func


def _chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           softmax_fp32: bool) -> torch.Tensor:
    """q [b, h, C, d], k/v [b, h, E, d], mask [b|1, 1, C, E] (True = masked) -> [b, h, C, d]."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(mask, MASK_FILL)
    dtype = scores.dtype
    probs = torch.softmax(scores.float() if softmax_fp32 else scores, dim=-1).to(dtype)
    return torch.matmul(probs, v)


class ChunkedDotProductAttention(DotProductAttention):
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def _covered(self, query, attention_mask, attention_bias, packed_seq_params) -> bool:
        return (attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.dim() == 4
                and query.size(0) > self.chunk_tokens and attention_bias is None and packed_seq_params is None
                and getattr(self, "softmax_offset", None) is None
                and not (self.training and self.config.attention_dropout > 0)
                and getattr(self.scale_mask_softmax, "scale", None) is None)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if not self._covered(query, attention_mask, attention_bias, packed_seq_params):
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
            args = (q[:, :, s:e], k[:, :, :e], v[:, :, :e], attention_mask[..., s:e, :e])
            if torch.is_grad_enabled():
                outs.append(checkpoint(_chunk, *args, scale, softmax_fp32, use_reentrant=False))
            else:
                outs.append(_chunk(*args, scale, softmax_fp32))
        context = torch.cat(outs, dim=2)  # [b, h, S, d]
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * d)
