"""Supervised warm start on the built-in task's noisy, partly redundant solution chains.

It runs through the same Megatron train step as RL (schedules, micro-batching, DP), with
the `sft_nll` loss in place of the clipped surrogate, so the warm start exercises and is
exercised by the production path.
"""

from __future__ import annotations

import torch

from erpo_mega.algo.config import LossConfig
from erpo_mega.algo.sft import sft_nll_loss
from erpo_mega.data.builtin_task import ArithmeticTask
from erpo_mega.data.prompts import encode_prompt
from erpo_mega.megatron.batching import PolicyBatch


def sft_batch(task: ArithmeticTask, tokenizer, data_cfg, step: int, batch_size: int, noise: float,
              redundancy: float, seed: int) -> PolicyBatch:
    """Step `step`'s examples: prompt ids + (noisy chain + eos) as the response to learn."""
    examples = task.sft_examples(batch_size, noise=noise, redundancy=redundancy, seed=seed * 1_000_003 + step)
    prompts, responses = [], []
    for ex in examples:
        prompts.append(encode_prompt(ex.item, tokenizer, data_cfg))
        responses.append(tokenizer.encode(ex.response, add_special_tokens=False) + [tokenizer.eos_token_id])
    n, t = len(responses), max(len(r) for r in responses)
    zeros = torch.zeros(n, t)
    return PolicyBatch(prompt_ids=prompts, response_ids=responses, advantages=zeros, old_logp=zeros)


def sft_step(worker, batch: PolicyBatch) -> dict[str, float]:
    return worker.train_step(batch, LossConfig(), loss_fn=sft_nll_loss)
