"""What the log-prob pass and the train step share: running megatron's schedule over packed
micro-batches and turning this rank's vocabulary-sharded logits into per-token values.

The schedule (`get_forward_backward_func`) owns pipelining; we only supply `forward_step`,
which feeds one `MicroBatch` to the model and hands back a loss function that sees the
logits on the last pipeline stage. Values computed there reach other ranks by explicit
collectives in the callers (`broadcast_from_last_stage`, DP reductions).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from erpo_mega.megatron.batching import MicroBatch
from erpo_mega.parallel.vocab_parallel import logprob_and_entropy


def packing_mode(model) -> str | None:
    """How several samples share a row for this model's core attention.

    "segments": our `ChunkedDotProductAttention` everywhere, fed the compact segment mask
    (`MicroBatch.segment_mask()`, no S x S tensor); "mask": megatron's local
    `DotProductAttention` with the explicit dense block-diagonal mask; "thd": TransformerEngine's attention with packed-sequence
    params (cu_seqlens per sample; GPU only, set ERPO_THD_PACKING=0 to fall back to one sample
    per micro-batch); None: one sample per micro-batch.
    """
    import os

    if prepare_packed_attention(model):
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        from erpo_mega.models.chunked_attention import ChunkedDotProductAttention

        cores = [m for m in model.modules() if isinstance(m, DotProductAttention)]
        return "segments" if all(isinstance(m, ChunkedDotProductAttention) for m in cores) else "mask"
    names = {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("DotProductAttention")}
    if names == {"TEDotProductAttention"} and os.environ.get("ERPO_THD_PACKING", "1") != "0":
        return "thd"
    return None


def prepare_packed_attention(model) -> bool:
    """True when every core attention of `model` honours our block-diagonal mask.

    megatron's local `DotProductAttention` applies an explicit boolean mask, except through
    the fused causal softmax kernel (GPU, half precision), which builds its own causal mask
    and would let packed samples see each other: that fusion is switched off here. Other
    attention backends (TransformerEngine) ignore the mask for causal layers: they pack
    through THD packed-sequence params instead (`packing_mode`).
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    found = False
    for module in model.modules():
        name = type(module).__name__
        if isinstance(module, DotProductAttention):
            module.scale_mask_softmax.scaled_masked_softmax_fusion = False
            found = True
        elif name.endswith("DotProductAttention"):
            return False
    return found


def mask_padded_vocab(logits_shard: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set the logits of megatron's vocabulary padding (ids >= vocab_size) to -inf.

    The embedding is padded to a multiple of 128 for resharding; those rows do not exist in
    the HuggingFace model or the rollout engine, so they must not take probability mass.
    Returns the input itself when this TP rank holds no padding.
    """
    from megatron.core import parallel_state as ps

    shard = logits_shard.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * shard
    if start + shard <= vocab_size:
        return logits_shard
    cols = torch.arange(start, start + shard, device=logits_shard.device) >= vocab_size
    return logits_shard.masked_fill(cols, float("-inf"))


def token_logprob_entropy(logits_shard: torch.Tensor, mb: MicroBatch, vocab_size: int, temperature: float,
                          entropy_grad: bool = False, inplace_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, T_mb] log-prob of each response token and entropy at its position (vocab-parallel).

    `inplace_grad`: backward writes the logits' gradient into their own storage (see
    `logprob_and_entropy`); only for logits that nothing else reads afterwards.
    """
    logits = mask_padded_vocab(logits_shard, vocab_size)
    logp, entropy = logprob_and_entropy(logits, mb.target_ids, temperature=temperature, entropy_grad=entropy_grad,
                                        inplace_grad=inplace_grad)
    return mb.unpack(logp), mb.unpack(entropy)


def run_schedule(model_chunks: Sequence[torch.nn.Module], micro_batches: list[MicroBatch],
                 loss_for: Callable[[MicroBatch, torch.Tensor], tuple], forward_only: bool,
                 packing: str | None = "mask") -> list:
    """Run megatron's forward(-backward) schedule; returns the loss functions' third outputs
    (one per micro-batch, on the last pipeline stage only; empty elsewhere).

    `loss_for(mb, logits)` must return megatron's 3-tuple `(loss, num_tokens, reported)`.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    device = next(model_chunks[0].parameters()).device
    micro_batches = [mb.to(device) for mb in micro_batches]
    lengths = {mb.num_tokens for mb in micro_batches}
    variable = get_model_config(model_chunks[0]).variable_seq_lengths
    if ps.get_pipeline_model_parallel_world_size() > 1 and len(lengths) != 1 and not variable:
        raise ValueError(f"pipeline parallelism without variable_seq_lengths in the model config needs "
                         f"micro-batches of one length, got {sorted(lengths)}")

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        if packing == "thd":  # TransformerEngine: per-sample sequences by cu_seqlens, no mask
            output = model(mb.input_ids, mb.position_ids, None, packed_seq_params=mb.thd_params())
        elif packing == "segments":  # chunked local attention: each query chunk's mask from segment ids
            output = model(mb.input_ids, mb.position_ids, mb.segment_mask())
        else:
            output = model(mb.input_ids, mb.position_ids, mb.attention_mask)
        return output, lambda logits: loss_for(mb, logits)

    schedule = get_forward_backward_func()
    return schedule(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=list(model_chunks),
        num_microbatches=len(micro_batches),
        seq_length=max(lengths),
        micro_batch_size=1,
        forward_only=forward_only,
    )


def broadcast_from_last_stage(obj):
    """Send a picklable object from the last pipeline stage to every stage of this pipeline."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return obj
    holder = [obj if ps.is_pipeline_last_stage(ignore_virtual=True) else None]
    dist.broadcast_object_list(holder, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    return holder[0]


def sum_over(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t
