"""A few ERPO steps of a tiny Qwen2-style policy under tensor parallelism 2, on CPU.

Each step is the RL step's training side in order: old-policy log-probs and entropies
(vocab-parallel, no vocabulary gather) -> synthetic rewards -> ERPO token advantages on the
whole batch -> one megatron train step (clipped surrogate, global normalisers).

    python examples/tp2_erpo_steps.py --steps 3             # spawns 2 gloo ranks itself
    torchrun --nproc-per-node 2 examples/tp2_erpo_steps.py  # or let torchrun start them

Rewards are synthetic: a response earns 1 when most of its tokens are even ids, so the
policy has something learnable and groups have mixed outcomes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from erpo_mega.algo import ERPOConfig, LossConfig, erpo_token_advantages  # noqa: E402
from erpo_mega.megatron.batching import PolicyBatch  # noqa: E402
from erpo_mega.megatron.config import OptimConfig, ParallelConfig  # noqa: E402
from erpo_mega.models.config import ModelConfig  # noqa: E402

MODEL = ModelConfig(arch="qwen2", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def synthetic_rollout(step: int, num_prompts: int, group_size: int, vocab: int):
    """Random prompts and responses (stand-ins for engine samples) with a checkable reward."""
    g = torch.Generator().manual_seed(1000 + step)
    prompts, responses, groups, rewards = [], [], [], []
    for p in range(num_prompts):
        prompt = torch.randint(0, vocab, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        for _ in range(group_size):
            resp = torch.randint(0, vocab, (int(torch.randint(4, 16, (1,), generator=g)),), generator=g).tolist()
            prompts.append(prompt)
            responses.append(resp)
            groups.append(p)
            rewards.append(float(sum(t % 2 == 0 for t in resp) * 2 > len(resp)))
    return prompts, responses, torch.tensor(groups), torch.tensor(rewards)


def run(steps: int, temperature: float = 1.0) -> list[dict]:
    from erpo_mega.megatron.worker import PolicyWorker

    worker = PolicyWorker().setup(MODEL, ParallelConfig(tp=2, pp=1, micro_batch_tokens=64),
                                  OptimConfig(lr=3e-3, warmup_steps=1, total_steps=100), bf16=False)
    erpo_cfg, loss_cfg = ERPOConfig(beta=0.5), LossConfig(clip_eps_low=0.2, clip_eps_high=0.28)
    rank0 = torch.distributed.get_rank() == 0
    history = []
    for step in range(1, steps + 1):
        prompts, responses, groups, rewards = synthetic_rollout(step, num_prompts=4, group_size=4,
                                                                vocab=MODEL.vocab_size)
        batch = PolicyBatch(prompts, responses)
        old_logp, entropy = worker.compute_logprobs(batch, temperature=temperature)
        adv, stats = erpo_token_advantages(rewards, entropy, batch.response_mask(), groups, erpo_cfg)
        train_batch = PolicyBatch(prompts, responses, advantages=adv, old_logp=old_logp)
        metrics = worker.train_step(train_batch, loss_cfg, temperature=temperature)
        row = {"step": step, "reward": float(rewards.mean()), "loss": metrics["loss"],
               "entropy": metrics["entropy"], "grad_norm": metrics["grad_norm"], "lr": metrics["lr"],
               "cdp_fraction": stats["cdp_fraction"], "entropy_mean_cdp": stats["entropy_mean_cdp"],
               "cdp_bucket_hist": stats["cdp_bucket_hist"], "clamp_fraction": stats["clamp_fraction"]}
        history.append(row)
        if rank0:
            hist = " ".join(f"{x:.2f}" for x in row["cdp_bucket_hist"])
            print(f"step {step}: reward {row['reward']:.3f} loss {row['loss']:+.5f} entropy {row['entropy']:.4f} "
                  f"grad_norm {row['grad_norm']:.4f} lr {row['lr']:.2e} | CDP fraction {row['cdp_fraction']:.3f} "
                  f"H@CDP {row['entropy_mean_cdp']:.4f} clamp {row['clamp_fraction']:.3f} buckets [{hist}]",
                  flush=True)
    return history


def _spawned(steps: int, temperature: float) -> list[dict]:
    from erpo_mega.parallel.dist import destroy_distributed

    try:
        return run(steps, temperature)
    finally:
        destroy_distributed()


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args(argv)
    if "RANK" in os.environ:  # started by torchrun / srun
        return _spawned(args.steps, args.temperature)
    from erpo_mega.parallel.spawn import run_distributed

    return run_distributed(_spawned, 2, args.steps, args.temperature)[0]


if __name__ == "__main__":
    main()
