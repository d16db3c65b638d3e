"""Next-token choice for a whole batch at once: SGLang's sampling semantics, in plain torch.

Order (as SGLang): logit_bias and penalties edit the logits; greedy (temperature < 1e-6 or
top_k == 1) takes the argmax; otherwise logits / temperature -> softmax -> top-k, top-p,
min-p truncation -> renormalise -> draw.

Drawing: each sequence owns a generator and consumes exactly one uniform number per token
(inverse CDF over the row's probabilities), so a seeded sequence draws the same tokens
whatever else shares its batch, and the batch needs no per-row Python sampling call. Rows that
truncate (top-k/top-p/min-p) draw over their sorted kept probabilities; rows that do not skip
the sort. Which path a row takes depends only on its own parameters.

Returned log-prob (documented choice, matching SGLang's default with
`SGLANG_RETURN_ORIGINAL_LOGPROB` unset): log_softmax(logits / temperature) of the chosen
token, i.e. temperature-scaled but *before* top-k/top-p/min-p truncation; for greedy,
log_softmax(logits). With `SGLANG_RETURN_ORIGINAL_LOGPROB=1` in the server environment it is
log_softmax of the unscaled logits, as in SGLang. The trainer recomputes log-probs at the
sampling temperature, so by default both sides use the same distribution. Log-probs are
gathered in the same pass as the draw.
"""

from __future__ import annotations

import os

import torch

from erpo_mega.models import engine_native
from erpo_mega.rollout.protocol import SamplingParams


def return_original_logprob() -> bool:
    return os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true", "yes")


def has_penalty(sp: SamplingParams) -> bool:
    return bool(sp.frequency_penalty or sp.presence_penalty or sp.repetition_penalty != 1.0)


def truncates(sp: SamplingParams) -> bool:
    return sp.top_k != -1 or sp.top_p < 1.0 or sp.min_p > 0.0


def row_temperatures(params: list[SamplingParams], greedy: list[bool],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B]: each row's temperature, 1 for greedy rows (their log-probs are the unscaled ones)."""
    return torch.tensor([1.0 if g else sp.temperature for g, sp in zip(greedy, params)], dtype=dtype)


def adjust_batch(raw: torch.Tensor, params: list[SamplingParams], history: list[list[int]],
                 banned: list[list[int]]) -> torch.Tensor:
    """logit_bias, frequency/presence/repetition penalties over generated tokens, and bans.

    raw [B, V]; returns raw itself when no row needs an edit (the common RL case).
    """
    bias_rows = [i for i, sp in enumerate(params) if sp.logit_bias]
    pen_rows = [i for i, sp in enumerate(params) if history[i] and has_penalty(sp)]
    ban_rows = [i for i, b in enumerate(banned) if b]
    if not (bias_rows or pen_rows or ban_rows):
        return raw
    logits = raw.clone()
    for i in bias_rows:
        toks = [int(t) for t in params[i].logit_bias]
        logits[i, toks] += torch.tensor(list(params[i].logit_bias.values()), dtype=logits.dtype)
    if pen_rows:
        v = logits.shape[1]
        idx = torch.tensor(pen_rows)
        counts = torch.stack([torch.bincount(torch.tensor(history[i]), minlength=v) for i in pen_rows])
        counts = counts.to(logits.dtype)
        seen = counts > 0
        col = lambda name: torch.tensor([float(getattr(params[i], name)) for i in pen_rows],  # noqa: E731
                                        dtype=logits.dtype)[:, None]
        sub = logits[idx] - (col("frequency_penalty") * counts + col("presence_penalty") * seen.to(logits.dtype))
        rep = col("repetition_penalty")
        penalised = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen & (rep != 1.0), penalised, sub)
        logits[idx] = sub
    if ban_rows:
        r = [i for i in ban_rows for _ in banned[i]]
        c = [t for i in ban_rows for t in banned[i]]
        logits[r, c] = float("-inf")
    return logits


def adjust_logits(logits: torch.Tensor, sp: SamplingParams, output_ids: list[int],
                  banned: list[int]) -> torch.Tensor:
    """One row's edits (the batched `adjust_batch` on a batch of one)."""
    return adjust_batch(logits[None], [sp], [output_ids], [banned])[0].clone()


def _keep_sorted(sorted_p: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor) -> torch.Tensor:
    """Which of each row's descending probabilities survive top-k, top-p and min-p (the first always)."""
    rank = torch.arange(sorted_p.shape[1])[None]
    keep = rank < top_k[:, None]
    keep &= (sorted_p.cumsum(1) - sorted_p) <= top_p[:, None]   # the smallest prefix reaching top_p
    keep &= sorted_p >= min_p[:, None] * sorted_p[:, :1]
    keep[:, 0] = True
    return keep


def _row_params(params: list[SamplingParams], v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    top_k = torch.tensor([v if sp.top_k == -1 else sp.top_k for sp in params])
    top_p = torch.tensor([sp.top_p for sp in params], dtype=torch.float32)
    min_p = torch.tensor([sp.min_p for sp in params], dtype=torch.float32)
    return top_k, top_p, min_p


def truncated_probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """Temperature softmax with top-k / top-p / min-p applied and renormalised (full vocab order)."""
    probs = torch.softmax(logits / sp.temperature, dim=-1)
    sorted_p, order = probs[None].sort(descending=True)
    kept = torch.where(_keep_sorted(sorted_p, *_row_params([sp], probs.numel())), sorted_p, 0.0)[0]
    out = torch.zeros_like(probs)
    out[order[0]] = kept / kept.sum()
    return out


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row: the first index whose cumulative mass exceeds u * total.

    Never lands on a zero-probability entry: `right=True` skips flat CDF steps, and the clamp
    to the first index reaching the total guards u * total rounding up to the total.
    """
    cdf = probs.cumsum(1)
    total = cdf[:, -1:]
    idx = torch.searchsorted(cdf, u[:, None].to(cdf.dtype) * total, right=True)
    last = (cdf < total).sum(1, keepdim=True)
    return torch.minimum(idx, last)[:, 0]


def sample_batch(raw: torch.Tensor, params: list[SamplingParams], uniforms: list[float],
                 history: list[list[int]], banned: list[list[int]]) -> tuple[list[int], list[float]]:
    """(token ids, log-probs) for every row of raw fp32 logits [B, V] in one pass.

    `uniforms[i]` is row i's draw in [0, 1) from its own generator (ignored for greedy rows).
    """
    b, v = raw.shape
    logits = adjust_batch(raw, params, history, banned)
    greedy = [sp.greedy for sp in params]
    fast = _sample_native(logits, params, greedy, uniforms)
    if fast is not None:
        return fast
    temps = row_temperatures(params, greedy, logits.dtype)[:, None]
    scaled = logits / temps
    scaled_lps = torch.log_softmax(scaled, -1)   # the log-probs returned, and exp() of it the probs
    tokens = torch.empty(b, dtype=torch.long)
    g_rows = [i for i in range(b) if greedy[i]]
    plain = [i for i in range(b) if not greedy[i] and not truncates(params[i])]
    trunc = [i for i in range(b) if not greedy[i] and truncates(params[i])]
    u = torch.tensor(uniforms, dtype=torch.float64)
    if len(g_rows) == b:
        tokens = logits.argmax(-1)
    elif g_rows:
        tokens[g_rows] = logits[g_rows].argmax(-1)
    if len(plain) == b:
        tokens = _draw(scaled_lps.exp(), u)
    elif plain:
        tokens[plain] = _draw(scaled_lps[plain].exp(), u[plain])
    if trunc:
        sorted_p, order = scaled_lps[trunc].exp().sort(-1, descending=True)
        kept = torch.where(_keep_sorted(sorted_p, *_row_params([params[i] for i in trunc], v)), sorted_p, 0.0)
        pick = _draw(kept, u[trunc])
        tokens[trunc] = order.gather(1, pick[:, None])[:, 0]
    all_lps = torch.log_softmax(raw, -1) if return_original_logprob() else scaled_lps
    lps = all_lps.gather(1, tokens[:, None])[:, 0]
    return tokens.tolist(), lps.tolist()


def _sample_native(logits: torch.Tensor, params: list[SamplingParams], greedy: list[bool],
                   uniforms: list[float]) -> tuple[list[int], list[float]] | None:
    """The whole batch in one C pass (`ek_sample`) when no row truncates (top-k/top-p/min-p) and
    log-probs are the scaled ones; None: the torch path below decides (also for a row with no
    finite logit, whose outcome the torch path defines)."""
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or return_original_logprob() \
            or any(not g and truncates(sp) for g, sp in zip(greedy, params)):
        return None
    ek = engine_native.kernels()
    if ek is None:
        return None
    tokens, lps = ek.sample(logits.contiguous(), row_temperatures(params, greedy),
                            torch.tensor(greedy, dtype=torch.uint8), torch.tensor(uniforms, dtype=torch.float64))
    out = tokens.tolist()
    if min(out, default=0) < 0:
        return None
    return out, lps.tolist()


def choose_token(raw_logits: torch.Tensor, sp: SamplingParams, output_ids: list[int], banned: list[int],
                 generator: torch.Generator) -> tuple[int, float]:
    """(token id, log-prob) for one sequence's next position; raw_logits is fp32 [V]."""
    u = 0.0 if sp.greedy else float(torch.rand((), generator=generator, dtype=torch.float64))
    tokens, lps = sample_batch(raw_logits[None], [sp], [u], [output_ids], [banned])
    return tokens[0], lps[0]
