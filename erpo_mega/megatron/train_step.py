"""One optimisation step of the policy with megatron-core's schedules, DDP and optimizer.

Exactness. The loss of a micro-batch comes from the policy loss with the step's GLOBAL
normalisers, so the step loss is the plain sum of micro-batch losses over micro-batches
and DP ranks. megatron by default divides each micro-batch loss by the number of
micro-batches and DDP averages gradients over DP; both would bend that sum. So the model
config runs in megatron's per-token mode (`calculate_per_token_loss=True`: no division by
the micro-batch count, DDP sums instead of averaging) and our `finalize_model_grads` hook
drops the token count megatron would divide by (our loss is already normalised). The
gradient is then exactly d(step loss)/d(params), whatever the micro-batch budget or DP.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from erpo_mega.algo.config import LossConfig
from erpo_mega.algo.loss import combine_metrics, policy_loss
from erpo_mega.megatron.batching import MicroBatch, PolicyBatch, global_normalizer
from erpo_mega.megatron.forward import broadcast_from_last_stage, run_schedule, token_logprob_entropy
from erpo_mega.megatron.logprob import packing_of, plan_for_this_rank


def finalize_grads_without_token_scaling(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
    """megatron's `finalize_model_grads` (DP reduction, embedding/PP syncs) minus the
    1/num_tokens scaling: our losses carry global normalisers already."""
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)


def configure_for_global_loss(model_config, ddp_chunks, optimizer) -> None:
    """Wire megatron's model config for exact global-loss gradients (see module docstring).

    `calculate_per_token_loss` must be set before DDP is constructed (it picks DDP's
    gradient scaling); `setup_policy` does that, this hooks the rest up afterwards.
    """
    if not model_config.calculate_per_token_loss:
        raise ValueError("model config: calculate_per_token_loss must be True before wrapping in DDP")
    model_config.finalize_model_grads_func = finalize_grads_without_token_scaling
    model_config.grad_scale_func = optimizer.scale_loss
    model_config.no_sync_func = ddp_chunks[0].no_sync if len(ddp_chunks) == 1 else [c.no_sync for c in ddp_chunks]


def _reduce_metrics_over_dp(metrics: dict[str, torch.Tensor], device) -> dict[str, float]:
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group()
    keys = sorted(metrics)
    sums = [k for k in keys if not k.endswith("_max")]
    maxes = [k for k in keys if k.endswith("_max")]
    out: dict[str, float] = {}
    for names, op in ((sums, dist.ReduceOp.SUM), (maxes, dist.ReduceOp.MAX)):
        if not names:
            continue
        t = torch.stack([metrics[k].detach().float().reshape(()) for k in names]).to(device)
        if dist.get_world_size(group) > 1:
            dist.all_reduce(t, op=op, group=group)
        out.update({k: float(v) for k, v in zip(names, t.tolist())})
    return out


def forward_backward(model_chunks: Sequence[torch.nn.Module], batch: PolicyBatch, loss_cfg: LossConfig, *,
                     vocab_size: int, micro_batch_tokens: int, temperature: float = 1.0,
                     loss_fn: Callable = policy_loss, pad_multiple: int = 1,
                     inplace_logits_grad: bool = True) -> dict[str, float]:
    """Zero the gradient buffers, then accumulate d(step loss)/d(params) into DDP's main_grad
    (reduced over DP). Returns the whole-step loss metrics, identical on every rank.

    `inplace_logits_grad`: the logits' gradient overwrites the logits (no fresh `[tokens, V/TP]`
    buffer). They are a temporary of `loss_for`: the loss reads only the per-token log-prob and
    entropy, and the output layer's backward needs its input and weight, not its output (a node
    that did save them would fail autograd's version check, not read the gradient).
    """
    from megatron.core import parallel_state as ps

    if batch.advantages is None or batch.old_logp is None:
        raise ValueError("batch: training needs advantages and old_logp")
    normalizer = global_normalizer(batch)
    packing = packing_of(model_chunks)
    micro_batches = plan_for_this_rank(batch, micro_batch_tokens, pad_multiple, pack=packing is not None)
    entropy_grad = loss_cfg.entropy_coef != 0

    def loss_for(mb: MicroBatch, logits: torch.Tensor):
        logp, entropy = token_logprob_entropy(logits, mb, vocab_size, temperature, entropy_grad=entropy_grad,
                                              inplace_grad=inplace_logits_grad)
        p = mb.per_token
        loss, metrics = loss_fn(logp, p["old_logp"].to(logp.dtype), p["advantages"].to(logp.dtype), mb.loss_mask,
                                loss_cfg, normalizer=normalizer, ref_logp=p.get("ref_logp"),
                                rollout_logp=p.get("rollout_logp"), entropy=entropy)
        return loss, mb.loss_mask.sum().to(torch.int), metrics

    for chunk in model_chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    reported = run_schedule(model_chunks, micro_batches, loss_for, forward_only=False, packing=packing)

    device = next(model_chunks[0].parameters()).device
    metrics: dict[str, float] | None = None
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        metrics = _reduce_metrics_over_dp(combine_metrics(reported), device)
    metrics = broadcast_from_last_stage(metrics)
    metrics.update(num_tokens=normalizer.num_tokens, num_seqs=normalizer.num_seqs,
                   num_micro_batches=float(len(micro_batches)))
    return metrics


def train_step(model_chunks: Sequence[torch.nn.Module], optimizer, scheduler, batch: PolicyBatch,
               loss_cfg: LossConfig, *, vocab_size: int, micro_batch_tokens: int, temperature: float = 1.0,
               loss_fn: Callable = policy_loss, pad_multiple: int = 1) -> dict[str, float]:
    """Forward, backward and one optimizer update over the whole batch.

    `batch` needs `advantages` and `old_logp` (and `ref_logp` / `rollout_logp` when the loss
    config uses them). Returns whole-step metrics, identical on every rank: the loss-function
    metrics (loss, pg_loss, clip fractions, approx_kl, entropy, ...) plus grad_norm (before
    clipping), lr, num_tokens, num_seqs, num_micro_batches (this rank's) and update_successful.
    """
    with warnings.catch_warnings():
        # The distributed optimizer's fp32 shards are views (non-leaf tensors); megatron's
        # zero_grad reads their `.grad` and torch warns on every step. Nothing is lost.
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
        optimizer.zero_grad()
    metrics = forward_backward(model_chunks, batch, loss_cfg, vocab_size=vocab_size,
                               micro_batch_tokens=micro_batch_tokens, temperature=temperature, loss_fn=loss_fn,
                               pad_multiple=pad_multiple)
    scheduler.step(1)  # the update of step k uses the lr of step k (k = 1, 2, ...)
    update_successful, grad_norm, _ = optimizer.step()
    metrics.update(
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        lr=float(optimizer.param_groups[0]["lr"]),
        update_successful=float(bool(update_successful)),
    )
    return metrics
