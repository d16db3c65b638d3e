"""No-grad log-prob/entropy pass (old policy, reference policy) over packed micro-batches.

Every rank returns the whole batch's [N, T] tensors: each DP replica computes its own
samples on its last pipeline stage, and two exact sum-reductions (zeros elsewhere) spread
them over the pipeline and then over data parallelism. TP ranks agree by construction (the
vocab-parallel function reduces over TP). The result feeds the advantage estimator, which
needs the whole batch's entropies before the batch is split.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from erpo_mega.megatron.batching import MicroBatch, PolicyBatch, plan_micro_batches
from erpo_mega.megatron.forward import packing_mode, run_schedule, sum_over, token_logprob_entropy


def plan_for_this_rank(batch: PolicyBatch, micro_batch_tokens: int, pad_multiple: int = 1,
                       pack: bool = True) -> list[MicroBatch]:
    """This rank's micro-batches; identical in the log-prob pass and the train step (same
    packing gives bitwise-equal forwards, so the first step's ratio is exactly 1)."""
    from megatron.core import parallel_state as ps

    # Each micro-batch keeps its own (pad_multiple-rounded) length at every PP size: the model
    # config has variable_seq_lengths under PP, so megatron's p2p sends shapes first.
    return plan_micro_batches(
        batch, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), micro_batch_tokens,
        pad_multiple=pad_multiple, pack=pack)


def packing_of(model_chunks) -> str | None:
    """"segments", "mask", "thd" or None (one sample per micro-batch); see `forward.packing_mode`."""
    modes = {packing_mode(getattr(c, "module", c)) for c in model_chunks}
    return modes.pop() if len(modes) == 1 else None


def packing_allowed(model_chunks) -> bool:
    """Whether several samples may share a row."""
    return packing_of(model_chunks) is not None


@torch.no_grad()
def compute_logprobs(model_chunks: Sequence[torch.nn.Module], batch: PolicyBatch, *, vocab_size: int,
                     micro_batch_tokens: int, temperature: float = 1.0, pad_multiple: int = 1
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of each response token and the entropy of the next-token
    distribution it was drawn from, both fp32 [N, T] (0 beyond each response), on every rank.

    `temperature` must be the rollout temperature so that log-probs are those of the
    sampling distribution.
    """
    from megatron.core import parallel_state as ps

    packing = packing_of(model_chunks)
    micro_batches = plan_for_this_rank(batch, micro_batch_tokens, pad_multiple, pack=packing is not None)
    was_training = [m.training for m in model_chunks]
    for m in model_chunks:
        m.eval()

    def loss_for(mb: MicroBatch, logits: torch.Tensor):
        logp, entropy = token_logprob_entropy(logits, mb, vocab_size, temperature)
        zero = logits.new_zeros((), dtype=torch.float32)
        return zero, torch.tensor(0, dtype=torch.int), {"logp": logp, "entropy": entropy}

    try:
        reported = run_schedule(model_chunks, micro_batches, loss_for, forward_only=True, packing=packing)
    finally:
        for m, mode in zip(model_chunks, was_training):
            m.train(mode)

    shape = (batch.num_samples, batch.max_response_len)
    out = torch.zeros((2, *shape), dtype=torch.float32)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for mb, values in zip(micro_batches, reported):
            mb.scatter_into(out[0], values["logp"].cpu())
            mb.scatter_into(out[1], values["entropy"].cpu())
    device = next(model_chunks[0].parameters()).device
    out = out.to(device)
    sum_over(out, ps.get_pipeline_model_parallel_group())
    sum_over(out, ps.get_data_parallel_group())
    return out[0].cpu(), out[1].cpu()
