"""Continuous batching over a slot KV cache: sequences join and leave the batch every step.

Pure model + sampling; knows nothing of HTTP or of the request queue (the engine's worker
decides who joins). Each step:
  * `admit(new)`: prefill the new sequences' prompts into free slots. Sequences with the same
    prompt (a GRPO group's `n` samples, or equal prompts from separate requests) prefill it
    once; the others copy its cached keys/values. Each draws its first token.
  * `step()`: one decode step for every running sequence, one batched sampling call.
  * finished sequences leave at once (`SlotKVCache.remove` moves one slot, not the batch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from erpo_mega.models import engine_native
from erpo_mega.models.torch_llm import SlotKVCache, TorchLLM
from erpo_mega.rollout.engine.sampling import (
    has_penalty,
    return_original_logprob,
    row_temperatures,
    sample_batch,
    truncates,
)
from erpo_mega.rollout.protocol import SamplingParams

_UNIFORM_CHUNK = 64


class AbortFlag:
    """`threading.Event`'s set/is_set without its lock and condition: one is made per sequence
    (hundreds per request) and nobody waits on it; a bool store is atomic under the GIL."""

    __slots__ = ("_set",)

    def __init__(self):
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


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
    abort: AbortFlag = field(default_factory=lambda: AbortFlag())
    abort_message: str = "Aborted by request"
    weight_version: str | None = None        # the weights this completion was generated with
    on_finish: Callable[[Sequence], None] | None = None
    error: BaseException | None = None       # set when a failed step ended this sequence
    _uniforms: list[float] = field(default_factory=list)

    def next_uniform(self) -> float:
        """This sequence's next draw in [0, 1): one per token, from its own generator, in chunks."""
        if not self._uniforms:
            self._uniforms = torch.rand(_UNIFORM_CHUNK, generator=self.generator, dtype=torch.float64).tolist()
            self._uniforms.reverse()
        return self._uniforms.pop()

    def plain_params(self) -> bool:
        """No logit_bias, penalties or top-k/top-p/min-p (fixed for the sequence's life)."""
        static = self.__dict__.get("_plain")
        if static is None:
            sp = self.params
            static = self._plain = not sp.logit_bias and not has_penalty(sp) and (sp.greedy or not truncates(sp))
        return static

    def plain_sampling(self) -> bool:
        """No logit edits (bias, penalties, bans now) and no top-k/top-p/min-p: the next token is
        a plain temperature draw (or argmax), which the native sampler does for the whole batch."""
        return self.plain_params() and (not self.stop_ids or len(self.output_ids) >= self.params.min_new_tokens)

    def check_finished(self, t: int) -> None:
        """`check_stop` and `check_abort` after `t` was appended, run only where one can fire
        (this is called per token and sequence)."""
        if t in self.stop_ids or self.stop_strings or len(self.output_ids) >= self.max_new_tokens \
                or self.abort.is_set():
            self.check_stop(t)
            self.check_abort()

    def banned(self) -> list[int]:
        """min_new_tokens: stop tokens may not be drawn before that many tokens exist."""
        if len(self.output_ids) < self.params.min_new_tokens:
            return sorted(self.stop_ids)
        return []

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

    def check_abort(self) -> None:
        if self.finish_reason is None and self.abort.is_set():
            self.finish_reason = {"type": "abort", "message": self.abort_message}

    def finish_early(self) -> bool:
        """Aborted before it started, or nothing to generate: finishes without a slot."""
        if self.abort.is_set():
            self.finish_reason = {"type": "abort", "message": self.abort_message}
        elif self.max_new_tokens == 0:
            self.finish_reason = {"type": "length", "length": 0}
        return self.finish_reason is not None

    def capacity(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens


@dataclass
class _BatchPlan:
    """What the native fast path needs that changes only when the running batch does."""

    version: int                 # BatchRunner._version it was built for
    plain: bool                  # every sequence's params are plain (`Sequence.plain_params`)
    pending_min: list[Sequence]  # those whose min_new_tokens may still ban their stop tokens
    greedy: list[bool]
    temps: torch.Tensor          # fp32 [B], 1 for greedy rows
    flags: torch.Tensor          # greedy as uint8 [B]
    window: bool | None = None   # multi-step windows allowed (decided on first need)


class BatchRunner:
    """The running batch: `seqs[i]` owns slot i of the cache. Not thread-safe (one worker)."""

    def __init__(self, model: TorchLLM):
        self.model = model
        self.seqs: list[Sequence] = []
        self.cache: SlotKVCache | None = None
        self._version = 0     # bumped whenever the running batch changes (join, leave)
        self._plan: _BatchPlan | None = None  # per-batch sampling arguments of the native fast path
        self._last = None     # (version, tokens drawn by the last step)

    @property
    def active(self) -> int:
        return len(self.seqs)

    @torch.no_grad()
    def admit(self, new: list[Sequence]) -> list[Sequence]:
        """Prefill `new` into the batch and draw each one's first token; returns those finished."""
        done = [s for s in new if s.finish_early()]
        new = [s for s in new if s.finish_reason is None]
        if not new:
            return done
        need = max(s.capacity() for s in self.seqs + new)
        if self.cache is None:
            self.cache = self.model.new_slot_cache(max(8, len(new)), max(64, need))
        cache = self.cache
        cache.reserve(cache.active + len(new), need)
        first = cache.active
        groups: dict[tuple[int, ...], list[int]] = {}
        for j, s in enumerate(new):
            groups.setdefault(tuple(s.prompt_ids), []).append(j)
        heads = [members[0] for members in groups.values()]
        device = self.model.lm_head.weight.device
        width = max(len(new[j].prompt_ids) for j in heads)
        ids = torch.zeros(len(heads), width, dtype=torch.long)
        for r, j in enumerate(heads):
            ids[r, : len(new[j].prompt_ids)] = torch.tensor(new[j].prompt_ids)
        lengths = torch.tensor([len(new[j].prompt_ids) for j in heads])
        slots = torch.tensor([first + j for j in heads])
        hidden = self.model.prefill_slots(ids.to(device), lengths.to(device), cache, slots.to(device))
        last = self.model.lm_head(hidden[torch.arange(len(heads)), lengths.to(device) - 1]).float()
        row_of = [0] * len(new)
        for r, members in enumerate(groups.values()):
            for j in members:
                row_of[j] = r
            if len(members) > 1:
                cache.copy_slot(first + members[0], [first + j for j in members[1:]], len(new[members[0]].prompt_ids))
            want = [new[j] for j in members if new[j].return_logprob and new[j].logprob_start_len >= 0]
            if want:
                n = len(new[members[0]].prompt_ids)
                plps = torch.log_softmax(self.model.lm_head(hidden[r, :n]).float(), dim=-1)
                for s in want:
                    s.input_logprobs = _prompt_logprobs(plps, s)
        cache.active += len(new)
        self.seqs.extend(new)
        self._version += 1
        self._sample(last[torch.tensor(row_of)], new)
        return done + self._collect()

    @torch.no_grad()
    def step(self, max_steps: int = 1) -> list[Sequence]:
        """One decode step for every running sequence; returns those that finished.

        `max_steps` > 1 (the engine passes it when no request waits to join) allows a window of
        up to that many steps in one native call per row part, where none can end a sequence
        in the middle except a stop token (then its later tokens are dropped: rows are
        independent, so the others' tokens are exactly those of single steps). The window is
        also bounded by `WINDOW_S` of estimated step time, so aborts and weight updates still
        act within a few milliseconds."""
        if not self.seqs:
            return []
        device = self.model.lm_head.weight.device
        seqs = self.seqs
        ek = engine_native.kernels() if device.type == "cpu" and not return_original_logprob() else None
        if ek is not None:
            # what depends only on who is in the batch is built when the batch changes
            plan = self._plan
            if plan is None or plan.version != self._version:
                greedy = [s.params.greedy for s in seqs]
                plan = self._plan = _BatchPlan(
                    self._version, all(s.plain_params() for s in seqs),
                    [s for s in seqs if s.stop_ids and s.params.min_new_tokens], greedy,
                    row_temperatures([s.params for s in seqs], greedy), torch.tensor(greedy, dtype=torch.uint8))
            if plan.plain and all(s.plain_sampling() for s in plan.pending_min):
                # same batch as the last step: its drawn tokens are this step's inputs
                tokens = self._last[1] if self._last is not None and self._last[0] == self._version else \
                    torch.tensor([s.output_ids[-1] for s in seqs], device=device)
                k = self._window(seqs, max_steps) if max_steps > 1 and self._plan_window() else 1
                if k > 1:
                    return self._steps(ek, seqs, tokens, k, plan)
                u = torch.tensor([0.0 if g else s.next_uniform() for g, s in zip(plan.greedy, seqs)],
                                 dtype=torch.float64)
                head = engine_native.SampleHead(ek, plan.temps, plan.flags, u)
                self.model.decode_slots_rows(tokens, self.cache, head)
                drawn = head.tokens.tolist()
                if min(drawn) < 0:
                    raise RuntimeError("decode step produced no finite logit for a sequence (NaN or -inf logits)")
                self._last = (self._version, head.tokens)
                self._apply(seqs, drawn, head.logprobs.tolist())
                return self._collect()
        self._last = None
        tokens = torch.tensor([s.output_ids[-1] for s in seqs], device=device)
        args = self._sampling_args(seqs)

        def head(logits: torch.Tensor, r0: int, r1: int):  # runs where rows [r0, r1) were computed
            return sample_batch(logits.cpu(), *(a[r0:r1] for a in args))

        parts = self.model.decode_slots_rows(tokens, self.cache, head)
        self._apply(seqs, [t for p in parts for t in p[0]], [lp for p in parts for lp in p[1]])
        return self._collect()

    WINDOW_S = 0.02  # a multi-step window's estimated length at most (latency for aborts, updates)

    def _plan_window(self) -> bool:
        """Multi-step windows for this batch: the one-call native step, no stop strings (they
        need the text after every token). Cached with the batch plan."""
        plan = self._plan
        if plan.window is None:
            plan.window = not any(s.stop_strings for s in self.seqs) and self.model.multi_step_ready()
        return plan.window

    def _window(self, seqs: list[Sequence], max_steps: int) -> int:
        """Steps until the first sequence reaches its length limit, at most `max_steps` and
        `WINDOW_S` at the last measured per-step time."""
        room = min(s.max_new_tokens - len(s.output_ids) for s in seqs)
        per_step = self.__dict__.get("_step_s")
        cap = min(2, max_steps) if per_step is None else max(1, min(max_steps, int(self.WINDOW_S / per_step)))
        return max(1, min(room, cap))

    def _steps(self, ek, seqs: list[Sequence], tokens: torch.Tensor, k: int, plan: _BatchPlan) -> list[Sequence]:
        """A window of k steps (see `step`): each sequence's k uniforms drawn in order from its
        own generator, as k single steps would."""
        import time

        zeros = [0.0] * k
        u = torch.tensor([zeros if g else [s.next_uniform() for _ in range(k)] for g, s in zip(plan.greedy, seqs)],
                         dtype=torch.float64).t().contiguous()
        head = engine_native.SampleHead(ek, plan.temps, plan.flags, u)
        t0 = time.perf_counter()
        self.model.decode_slots_steps(tokens, self.cache, head)
        self._step_s = (time.perf_counter() - t0) / k
        self._last = (self._version, head.tokens[k - 1])
        self._apply_steps(seqs, head.tokens.t().tolist(), head.logprobs.t().tolist())
        return self._collect()

    @staticmethod
    def _apply_steps(seqs: list[Sequence], tokens: list[list[int]], lps: list[list[float]]) -> None:
        """`_apply` for a window: a sequence keeps its tokens up to its first stop token."""
        for s, ts, ls in zip(seqs, tokens, lps):
            if s.stop_ids and not s.stop_ids.isdisjoint(ts):
                j = next(j for j, t in enumerate(ts) if t in s.stop_ids)
                del ts[j + 1:], ls[j + 1:]
            s.output_ids += ts
            s.output_logprobs += ls
            s.check_finished(ts[-1])

    def abort_all(self, reason: dict) -> list[Sequence]:
        """Drop every running sequence (after a failed step); returns them."""
        out = self.seqs
        for s in out:
            s.finish_reason = s.finish_reason or reason
        self.seqs = []
        self._version += 1
        if self.cache is not None:
            self.cache.clear()
        return out

    @staticmethod
    def _sampling_args(seqs: list[Sequence]) -> tuple[list, list, list, list]:
        """sample_batch's per-row arguments (params, uniforms, history, banned); each sequence
        draws its uniform here, in row order, so a seeded sequence's draws do not depend on how
        the batch is split."""
        return ([s.params for s in seqs], [0.0 if s.params.greedy else s.next_uniform() for s in seqs],
                [s.output_ids for s in seqs], [s.banned() for s in seqs])

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        tokens, lps = sample_batch(logits.cpu(), *self._sampling_args(seqs))
        self._apply(seqs, tokens, lps)

    @staticmethod
    def _apply(seqs: list[Sequence], tokens: list[int], lps: list[float]) -> None:
        for s, t, lp in zip(seqs, tokens, lps):
            s.output_ids.append(t)
            s.output_logprobs.append(lp)
            s.check_finished(t)

    def _collect(self) -> list[Sequence]:
        finished = [i for i, s in enumerate(self.seqs) if s.finish_reason is not None]
        if finished:
            self._version += 1
        out = [self.seqs[i] for i in finished]
        for i in reversed(finished):
            moved = self.cache.remove(i)
            if moved >= 0:
                self.seqs[i] = self.seqs[moved]
            self.seqs.pop()
        return out


def _prompt_logprobs(lps: torch.Tensor, s: Sequence) -> list[float | None]:
    """Log-probs of prompt tokens [logprob_start_len:] under the unscaled model (first is None)."""
    out: list[float | None] = []
    for pos in range(s.logprob_start_len, len(s.prompt_ids)):
        out.append(None if pos == 0 else float(lps[pos - 1, s.prompt_ids[pos]]))
    return out


@torch.no_grad()
def run_batch(model: TorchLLM, seqs: list[Sequence], wait_if_paused: Callable[[], None] = lambda: None) -> None:
    """Generate every sequence to completion (all admitted at once): for tests and benchmarks."""
    runner = BatchRunner(model)
    runner.admit(list(seqs))
    while runner.active:
        wait_if_paused()
        runner.step()
