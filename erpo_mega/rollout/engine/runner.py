"""Static-batch generation with a KV cache: prefill a left-padded batch, then decode.

Pure model + sampling; knows nothing of HTTP. Finished sequences leave the batch (their
cache rows are dropped), so a long completion does not make short ones pay for padding.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from erpo_mega.models.torch_llm import TorchLLM
from erpo_mega.rollout.engine.sampling import choose_token
from erpo_mega.rollout.protocol import SamplingParams


@dataclass
class Sequence:
    """One completion being generated (one prompt x one of its `n` samples)."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    stop_ids: set[int]                       # eos (unless ignore_eos) + stop_token_ids
    max_new_tokens: int
    return_logprob: bool = False
    logprob_start_len: int = -1
    stop_strings: list[str] = field(default_factory=list)
    decode: Callable[[list[int]], str] | None = None
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    input_logprobs: list[float | None] | None = None
    finish_reason: dict | None = None
    abort: threading.Event = field(default_factory=threading.Event)
    abort_message: str = "Aborted by request"

    def check_stop(self, token: int) -> None:
        if token in self.stop_ids:
            self.finish_reason = {"type": "stop", "matched": token}
        elif self.stop_strings and self.decode is not None:
            text = self.decode(self.output_ids)
            for s in self.stop_strings:
                if s in text:
                    self.finish_reason = {"type": "stop", "matched": s}
                    break
        if self.finish_reason is None and len(self.output_ids) >= self.max_new_tokens:
            self.finish_reason = {"type": "length", "length": self.max_new_tokens}


def _banned(seq: Sequence) -> list[int]:
    """min_new_tokens: stop tokens may not be drawn before that many tokens exist."""
    if len(seq.output_ids) < seq.params.min_new_tokens:
        return sorted(seq.stop_ids)
    return []


@torch.no_grad()
def run_batch(model: TorchLLM, seqs: list[Sequence], wait_if_paused: Callable[[], None] = lambda: None) -> None:
    """Generate every sequence to completion (fills output_ids, logprobs, finish_reason)."""
    live = [s for s in seqs if not _finish_early(s)]
    if not live:
        return
    device = model.lm_head.weight.device
    width = max(len(s.prompt_ids) for s in live)
    ids = torch.zeros(len(live), width, dtype=torch.long)
    mask = torch.zeros(len(live), width, dtype=torch.bool)
    for i, s in enumerate(live):
        ids[i, width - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
        mask[i, width - len(s.prompt_ids):] = True
    cache = model.new_cache(len(live), width + max(s.max_new_tokens for s in live))
    logits = model(ids.to(device), mask.to(device), cache)
    for i, s in enumerate(live):
        if s.return_logprob and s.logprob_start_len >= 0:
            s.input_logprobs = _prompt_logprobs(logits[i, width - len(s.prompt_ids):], s)
    last = logits[:, -1]
    while live:
        for i, s in enumerate(live):
            token, lp = choose_token(last[i], s.params, s.output_ids, _banned(s), s.generator)
            s.output_ids.append(token)
            s.output_logprobs.append(lp)
            s.check_stop(token)
        wait_if_paused()
        for s in live:
            if s.finish_reason is None and s.abort.is_set():
                s.finish_reason = {"type": "abort", "message": s.abort_message}
        keep = [i for i, s in enumerate(live) if s.finish_reason is None]
        if not keep:
            return
        if len(keep) < len(live):
            cache.select(torch.tensor(keep, device=device))
            live = [live[i] for i in keep]
        nxt = torch.tensor([[s.output_ids[-1]] for s in live], device=device)
        last = model(nxt, None, cache)[:, -1]


def _finish_early(s: Sequence) -> bool:
    if s.abort.is_set():
        s.finish_reason = {"type": "abort", "message": s.abort_message}
    elif s.max_new_tokens == 0:
        s.finish_reason = {"type": "length", "length": 0}
    return s.finish_reason is not None


def _prompt_logprobs(logits: torch.Tensor, s: Sequence) -> list[float | None]:
    """Log-probs of prompt tokens [logprob_start_len:] under the unscaled model (first is None)."""
    lps = torch.log_softmax(logits.float(), dim=-1)
    out: list[float | None] = []
    for pos in range(s.logprob_start_len, len(s.prompt_ids)):
        out.append(None if pos == 0 else float(lps[pos - 1, s.prompt_ids[pos]]))
    return out
