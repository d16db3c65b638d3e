"""Next-token choice for one sequence: SGLang's sampling semantics, in plain torch.

Order (as SGLang): logit_bias and penalties edit the logits; greedy (temperature < 1e-6 or
top_k == 1) takes the argmax; otherwise logits / temperature -> softmax -> top-k, top-p,
min-p truncation -> renormalise -> draw with the request's own generator.

Returned log-prob (documented choice, matching SGLang's default with
`SGLANG_RETURN_ORIGINAL_LOGPROB` unset): log_softmax(logits / temperature) of the chosen
token, i.e. temperature-scaled but *before* top-k/top-p/min-p truncation; for greedy,
log_softmax(logits). With `SGLANG_RETURN_ORIGINAL_LOGPROB=1` in the server environment it is
log_softmax of the unscaled logits, as in SGLang. The trainer recomputes log-probs at the
sampling temperature, so by default both sides use the same distribution.
"""

from __future__ import annotations

import os

import torch

from erpo_mega.rollout.protocol import SamplingParams


def return_original_logprob() -> bool:
    return os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true", "yes")


def adjust_logits(logits: torch.Tensor, sp: SamplingParams, output_ids: list[int],
                  banned: list[int]) -> torch.Tensor:
    """logit_bias, frequency/presence/repetition penalties over generated tokens, and bans."""
    logits = logits.clone()
    if sp.logit_bias:
        for tok, bias in sp.logit_bias.items():
            logits[int(tok)] += bias
    if output_ids and (sp.frequency_penalty or sp.presence_penalty or sp.repetition_penalty != 1.0):
        counts = torch.bincount(torch.tensor(output_ids), minlength=logits.numel()).to(logits.dtype)
        seen = counts > 0
        logits -= sp.frequency_penalty * counts + sp.presence_penalty * seen.to(logits.dtype)
        if sp.repetition_penalty != 1.0:
            penalised = torch.where(logits > 0, logits / sp.repetition_penalty, logits * sp.repetition_penalty)
            logits = torch.where(seen, penalised, logits)
    if banned:
        logits[banned] = float("-inf")
    return logits


def truncated_probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """Temperature softmax with top-k / top-p / min-p applied and renormalised (full vocab order)."""
    probs = torch.softmax(logits / sp.temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = torch.ones_like(sorted_p, dtype=torch.bool)
    if sp.top_k != -1:
        keep[sp.top_k:] = False
    if sp.top_p < 1.0:
        keep &= (sorted_p.cumsum(0) - sorted_p) <= sp.top_p   # keep the smallest prefix reaching top_p
    if sp.min_p > 0.0:
        keep &= sorted_p >= sp.min_p * sorted_p[0]
    keep[0] = True
    kept = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    out = torch.zeros_like(probs)
    out[order] = kept / kept.sum()
    return out


def choose_token(raw_logits: torch.Tensor, sp: SamplingParams, output_ids: list[int], banned: list[int],
                 generator: torch.Generator) -> tuple[int, float]:
    """(token id, log-prob) for one sequence's next position; raw_logits is fp32 [V]."""
    logits = adjust_logits(raw_logits, sp, output_ids, banned)
    if sp.greedy:
        token = int(torch.argmax(logits))
        logprobs = torch.log_softmax(logits, dim=-1)
    else:
        probs = truncated_probs(logits, sp)
        token = int(torch.multinomial(probs, 1, generator=generator))
        logprobs = torch.log_softmax(logits / sp.temperature, dim=-1)
    if return_original_logprob():
        logprobs = torch.log_softmax(raw_logits, dim=-1)
    return token, float(logprobs[token])
