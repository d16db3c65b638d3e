"""Helpers for the multi-process megatron tests: full-tensor views of sharded models, a fixed
case (tiny model + synthetic rollout batch), and the per-layout routine the spawns run.

Full tensors are assembled from each rank's `sharded_state_dict` metadata (global shape and
offset of every local shard) with plain all_gather_object: no dist-checkpointing involved,
so it is an independent way to compare layouts and to check checkpoint round trips.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from erpo_mega.models.config import ModelConfig

MODEL = ModelConfig(arch="qwen2", vocab_size=200, hidden_size=64, intermediate_size=96, num_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
GROUP_SIZE = 3


def _local_shards(model) -> list:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    out = []

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, ShardedTensor):
            out.append(x)

    walk(sd)
    return out


def _region(st):
    lead = (1,) * st.prepend_axis_num
    view = st.data.reshape(lead + tuple(st.data.shape))
    return tuple(slice(o, o + n) for o, n in zip(st.global_offset, view.shape)), view


def set_full_weights(model, seed: int = 0) -> None:
    """Give every layout the same weights: each full tensor is drawn from a generator seeded
    by its checkpoint key, and each rank copies in its own slice."""
    with torch.no_grad():
        for st in _local_shards(model):
            g = torch.Generator().manual_seed(seed * 1000003 + zlib.crc32(st.key.encode()))
            full = torch.randn(st.global_shape, generator=g) * 0.15
            if "norm" in st.key:
                full = 1.0 + full
            idx, view = _region(st)
            view.copy_(full[idx].to(view.dtype))


def gather_full(model, tensor_of=None) -> dict[str, torch.Tensor]:
    """{checkpoint key: full fp32 tensor} assembled on every rank.

    `tensor_of(param)` picks what to read (default the parameter itself; e.g. its main_grad).
    """
    shards = []
    with torch.no_grad():
        saved = []
        if tensor_of is not None:
            for p in model.parameters():
                saved.append(p.data.clone())
                p.data.copy_(tensor_of(p))
        try:
            for st in _local_shards(model):
                idx, view = _region(st)
                shards.append((st.key, tuple(st.global_shape), [(s.start, s.stop) for s in idx],
                               view.detach().float().cpu().clone()))
        finally:
            for p, old in zip(model.parameters(), saved):
                p.data.copy_(old)
    everyone = [None] * dist.get_world_size() if dist.is_initialized() else [shards]
    if dist.is_initialized():
        dist.all_gather_object(everyone, shards)
    full: dict[str, torch.Tensor] = {}
    for rank_shards in everyone:
        for key, shape, idx, data in rank_shards:
            t = full.setdefault(key, torch.full(shape, float("nan")))
            t[tuple(slice(a, b) for a, b in idx)] = data
    return full


def make_rollout(seed: int = 0, num_prompts: int = 4):
    """Synthetic rollout: prompts, responses of varied lengths, group ids, rewards."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses, groups, rewards = [], [], [], []
    for p in range(num_prompts):
        prompt = torch.randint(0, MODEL.vocab_size, (int(torch.randint(2, 9, (1,), generator=g)),),
                               generator=g).tolist()
        for k in range(GROUP_SIZE):
            n = int(torch.randint(1, 14, (1,), generator=g))
            responses.append(torch.randint(0, MODEL.vocab_size, (n,), generator=g).tolist())
            prompts.append(prompt)
            groups.append(p)
            rewards.append(float((p + k) % 2))
    return prompts, responses, torch.tensor(groups), torch.tensor(rewards)


def synthetic_entropy(shape, seed: int = 2) -> torch.Tensor:
    """A fixed, well-spread entropy map for the advantage estimator.

    ERPO z-scores entropies inside groups and buckets; with a tiny random model the entropies
    are nearly equal, so rounding differences between layouts (1e-6) would be amplified into
    different advantages. Feeding every layout the same entropy map keeps the train-step
    comparison about the train step.
    """
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 3.0


def training_batch(prompts, responses, groups, rewards, logp, entropy=None, seed: int = 1):
    """ERPO advantages computed on the whole batch (before any split) and ref/rollout
    log-probs perturbed from the old ones, so the KL and TIS terms are non-trivial."""
    from erpo_mega.algo import ERPOConfig, erpo_token_advantages
    from erpo_mega.megatron.batching import PolicyBatch

    probe = PolicyBatch(prompts, responses)
    mask = probe.response_mask()
    entropy = synthetic_entropy(mask.shape) * mask if entropy is None else entropy
    adv, stats = erpo_token_advantages(rewards, entropy, mask, groups, ERPOConfig(beta=0.5))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(logp.shape, generator=g) * 0.05 * mask
    return PolicyBatch(prompts, responses, advantages=adv, old_logp=logp, ref_logp=logp + noise,
                       rollout_logp=logp - noise), stats
