"""One rollout: a batch of prompt groups -> sampled responses with log-probs -> rewards.

Every sample carries its own `sampling_seed`, derived from (run seed, step, sample index),
so a resumed run draws exactly the samples the uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from erpo_mega.data.batcher import PromptBatch
from erpo_mega.data.types import PromptItem
from erpo_mega.rollout.client import SGLangClient
from erpo_mega.rollout.protocol import GenerateOutput


def sample_seed(run_seed: int, step: int, index: int, salt: str = "rollout") -> int:
    digest = hashlib.blake2b(f"{salt}:{run_seed}:{step}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@dataclass
class Rollout:
    """One step's samples in sample order (the G samples of a prompt are adjacent)."""

    items: list[PromptItem]
    group_ids: list[int]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    rollout_logp: list[list[float]]
    texts: list[str]
    rewards: list[float]
    truncated: list[bool]
    weight_versions: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.response_ids)


def generate_rollout(client: SGLangClient, batch: PromptBatch, prompt_ids: list[list[int]], tokenizer,
                     reward_fn, *, run_seed: int, step: int, max_new_tokens: int, temperature: float,
                     top_p: float = 1.0, top_k: int = -1, salt: str = "rollout", concurrency: int = 8,
                     extra_sampling: dict | None = None) -> Rollout:
    """Sample `batch.group_size` responses per prompt and score them.

    `prompt_ids[g]` are the token ids of `batch.items[g]`. Responses keep their stop token
    (the model must learn to stop); the engine's log-prob of each sampled token is kept for
    the train/rollout mismatch metrics. `extra_sampling` adds SGLang sampling params (the
    benchmark forces lengths with `ignore_eos`).
    """
    expanded = batch.expanded()
    inputs = [prompt_ids[g] for g, _ in expanded]
    # One request per sample, each with its own seed, so a sample does not depend on which
    # other requests the engine happened to batch it with.
    bodies = [{"input_ids": inp, "return_logprob": True,
               "sampling_params": dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                       top_k=top_k, sampling_seed=sample_seed(run_seed, step, i, salt),
                                       **(extra_sampling or {}))}
              for i, inp in enumerate(inputs)]
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(bodies)))) as pool:
        outputs = [GenerateOutput.from_json(r) for r in pool.map(client.generate_raw, bodies)]
    response_ids, logps, texts, truncated, versions = [], [], [], [], []
    for out in outputs:
        ids = list(out.output_ids)
        lp = list(out.output_token_logprobs or [])
        if len(lp) != len(ids):
            raise RuntimeError(f"engine returned {len(ids)} tokens but {len(lp)} log-probs")
        response_ids.append(ids)
        logps.append(lp)
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
        reason = (out.finish_reason or {}).get("type")
        truncated.append(reason == "length")
        versions.append(out.weight_version)
    items = [item for _, item in expanded]
    rewards = reward_fn.batch(items, texts)
    return Rollout(items=items, group_ids=[g for g, _ in expanded], prompt_ids=inputs, response_ids=response_ids,
                   rollout_logp=logps, texts=texts, rewards=[float(r) for r in rewards], truncated=truncated,
                   weight_versions=versions)
