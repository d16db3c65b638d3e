"""Built-in verifiable task: modular multi-step arithmetic with a chain-of-steps answer.

Made for the embedded tiny run (a ~1M-parameter model on 2 CPU cores): every number is small,
every step is a one-token lookup, yet the answer needs several dependent steps, so a model that
learned the steps imperfectly loses accuracy with chain length and RL has something to fix.

Format (default knobs: 2-4 operations, operands 0-9, arithmetic mod 10, left to right):
    prompt:   7+3*2-4
    solution: 7+3=0;0*2=0;0-4=6;#6
Each step is `a<op>b=r;` where `a` is the running value (the first operand, then the previous
result); `#` marks the final answer. With `precedence=True`, `*` binds first and the steps follow
that order (`3*2=6;7+6=3;3-4=9;#9`). All results are reduced mod `modulus`.

Splits are assigned by a stable hash of the prompt string, so train/validation/test never share a
prompt for any seed or sample count (the seed only picks which prompts of a split are drawn).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from erpo_mega.config import ConfigError, bounds
from erpo_mega.data.types import DataError, PromptItem

Split = Literal["train", "validation", "test"]
SPLITS: tuple[str, ...] = ("train", "validation", "test")
CHECKER_NAME = "builtin_arithmetic"
_SPLIT_SALT = "erpo-mega-arith-v1"
_ANSWER_RE = re.compile(r"#(-?\d+)\s*$")


@dataclass
class ArithmeticTaskConfig:
    """Difficulty knobs. More operations or a larger modulus make the task harder."""

    min_ops: int = field(default=2, metadata=bounds(ge=1))
    max_ops: int = field(default=4, metadata=bounds(ge=1, le=16))
    max_operand: int = field(default=9, metadata=bounds(ge=1))
    modulus: int = field(default=10, metadata=bounds(ge=2))
    ops: str = "+-*"
    precedence: bool = False
    # Fraction of all prompts (by hash) reserved for validation, and the same again for test.
    eval_fraction: float = field(default=0.1, metadata=bounds(gt=0, lt=0.5))
    # Reward for a well-formed `#N` answer that is wrong (0 = pure correctness reward).
    format_reward: float = field(default=0.0, metadata=bounds(ge=0, lt=1))

    def __post_init__(self) -> None:
        if self.min_ops > self.max_ops:
            raise ConfigError("min_ops", f"must be <= max_ops ({self.max_ops}), got {self.min_ops}")
        if not self.ops or set(self.ops) - set("+-*") or len(set(self.ops)) != len(self.ops):
            raise ConfigError("ops", f"must be distinct characters from '+-*', got {self.ops!r}")


@dataclass(frozen=True)
class Step:
    left: int
    op: str
    right: int
    result: int

    def text(self, result: int | None = None) -> str:
        return f"{self.left}{self.op}{self.right}={self.result if result is None else result}"


@dataclass(frozen=True)
class SFTExample:
    """A prompt with one (possibly noisy) solution chain to imitate."""

    item: PromptItem
    response: str


def split_of(prompt: str, eval_fraction: float) -> str:
    """Which split a prompt belongs to: a pure function of the prompt text."""
    digest = hashlib.blake2b(f"{_SPLIT_SALT}:{prompt}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2**64
    if u < eval_fraction:
        return "test"
    if u < 2 * eval_fraction:
        return "validation"
    return "train"


def parse_final_answer(response: str) -> int | None:
    """The integer after `#` when the response ends with `#N` and has a single `#`; else None."""
    if response.count("#") != 1:
        return None
    m = _ANSWER_RE.search(response)
    return int(m.group(1)) if m else None


def check_answer(answer: str, response: str, format_reward: float = 0.0) -> float:
    """1.0 when the response's final `#N` equals `answer` (as integers), `format_reward` when it is
    well-formed but wrong, 0.0 when malformed (no `#`, several `#`, text after the answer)."""
    got = parse_final_answer(response)
    if got is None:
        return 0.0
    try:
        want = int(answer.strip())
    except ValueError:
        return 0.0
    return 1.0 if got == want else format_reward


class ArithmeticTask:
    """Generates prompts, reference chains and noisy SFT chains; scores responses."""

    def __init__(self, config: ArithmeticTaskConfig | None = None, seed: int = 0):
        self.config = config or ArithmeticTaskConfig()
        self.seed = seed

    # ---- expressions -------------------------------------------------------------------------
    def _random_prompt(self, rng: np.random.Generator) -> str:
        c = self.config
        n_ops = int(rng.integers(c.min_ops, c.max_ops + 1))
        operands = rng.integers(0, c.max_operand + 1, size=n_ops + 1)
        ops = rng.choice(list(c.ops), size=n_ops)
        parts = [str(operands[0])]
        for op, x in zip(ops, operands[1:]):
            parts += [str(op), str(x)]
        return "".join(parts)

    def solve(self, prompt: str) -> list[Step]:
        """The reference steps for an expression (in evaluation order)."""
        values, ops = self._parse(prompt)
        steps = []
        while ops:
            i = self._next_op(ops)
            step = Step(values[i], ops[i], values[i + 1], self._apply(values[i], ops[i], values[i + 1]))
            steps.append(step)
            values[i : i + 2] = [step.result]
            del ops[i]
        return steps

    @staticmethod
    def _parse(prompt: str) -> tuple[list[int], list[str]]:
        tokens = re.findall(r"\d+|[+\-*]", prompt)
        if not tokens or "".join(tokens) != prompt or len(tokens) % 2 == 0 or not tokens[0].isdigit():
            raise ValueError(f"not a task expression: {prompt!r}")
        return [int(t) for t in tokens[0::2]], list(tokens[1::2])

    def _next_op(self, ops: list[str]) -> int:
        """Index of the operation evaluated next: leftmost, or leftmost `*` under precedence."""
        return ops.index("*") if self.config.precedence and "*" in ops else 0

    def _apply(self, a: int, op: str, b: int) -> int:
        m = self.config.modulus
        if op == "+":
            return (a + b) % m
        if op == "-":
            return (a - b) % m
        return (a * b) % m

    def answer(self, prompt: str) -> int:
        steps = self.solve(prompt)
        return steps[-1].result

    def clean_chain(self, prompt: str) -> str:
        """The shortest correct solution: every step once, then `#answer`."""
        steps = self.solve(prompt)
        return "".join(s.text() + ";" for s in steps) + f"#{steps[-1].result}"

    # ---- splits ------------------------------------------------------------------------------
    def items(self, split: str, n: int, seed: int | None = None) -> list[PromptItem]:
        """`n` distinct prompts of `split`, deterministic in (config, seed, split, n-prefix)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        seed = self.seed if seed is None else seed
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        seen: dict[str, None] = {}
        budget = 200 * n + 10_000
        while len(seen) < n and budget > 0:
            budget -= 1
            p = self._random_prompt(rng)
            if p not in seen and split_of(p, self.config.eval_fraction) == split:
                seen[p] = None
        if len(seen) < n:
            raise DataError(
                f"builtin task: found only {len(seen)} distinct '{split}' prompts, {n} requested; "
                f"raise max_ops/max_operand or lower the size (knobs: {self.config})")
        return [self._item(p, split, i) for i, p in enumerate(seen)]

    def _item(self, prompt: str, split: str, index: int) -> PromptItem:
        steps = self.solve(prompt)
        return PromptItem(prompt=prompt, answer=str(steps[-1].result), meta={
            "source": "builtin", "checker": CHECKER_NAME, "split": split, "index": index,
            "num_ops": len(steps), "format_reward": self.config.format_reward})

    # ---- SFT chains --------------------------------------------------------------------------
    def noisy_chain(self, prompt: str, rng: np.random.Generator, noise: float = 0.05,
                    redundancy: float = 0.4) -> str:
        """A solution chain with human-like waste and slips.

        redundancy: chance of restating the problem first, and per step of restating the step
            or taking a detour (a side computation on two prompt numbers that is not used).
        noise: per-step chance of a slip (a wrong result). 80% of slips are fixed at once by
            restating the step correctly; the rest propagate, so the final answer is wrong.
        """
        c = self.config
        values, ops = self._parse(prompt)
        numbers = list(values)
        parts: list[str] = []
        if rng.random() < redundancy / 2:
            parts.append(prompt)
        while ops:
            if rng.random() < redundancy / 2:  # detour: a side computation that is never used
                a, b = (int(x) for x in rng.choice(numbers, size=2))
                op = str(rng.choice(list(c.ops)))
                parts.append(Step(a, op, b, self._apply(a, op, b)).text())
            i = self._next_op(ops)
            step = Step(values[i], ops[i], values[i + 1], self._apply(values[i], ops[i], values[i + 1]))
            result = step.result
            if rng.random() < noise:
                wrong = (result + int(rng.integers(1, c.modulus))) % c.modulus
                parts.append(step.text(wrong))
                if rng.random() < 0.2:
                    result = wrong  # an uncorrected slip: every later step builds on it
                else:
                    parts.append(step.text())
            else:
                parts.append(step.text())
            if rng.random() < redundancy / 2:  # restate the step just written
                parts.append(parts[-1])
            values[i : i + 2] = [result]
            del ops[i]
        return "".join(p + ";" for p in parts) + f"#{values[0]}"

    def sft_examples(self, n: int, noise: float = 0.05, redundancy: float = 0.4,
                     seed: int | None = None) -> list[SFTExample]:
        """`n` training-split prompts, each with a noisy, partly redundant chain."""
        seed = self.seed if seed is None else seed
        items = self.items("train", n, seed=seed)
        rng = np.random.default_rng([seed, 7919])
        return [SFTExample(it, self.noisy_chain(it.prompt, rng, noise, redundancy)) for it in items]

    # ---- scoring -----------------------------------------------------------------------------
    def score(self, item: PromptItem, response: str) -> float:
        """1.0 for the correct final `#N`; see `check_answer` for the exact rules."""
        return check_answer(item.answer, response, self.config.format_reward)


def sanity_check(task: ArithmeticTask, n: int = 500, noise: float = 0.05,
                 redundancy: float = 0.4) -> dict[str, float]:
    """Accuracy of the reference chains (must be 1.0) and of the noisy SFT chains (~1 - slips)."""
    items = task.items("validation", n)
    clean = float(np.mean([task.score(it, task.clean_chain(it.prompt)) for it in items]))
    sft = task.sft_examples(n, noise=noise, redundancy=redundancy)
    noisy = float(np.mean([task.score(ex.item, ex.response) for ex in sft]))
    return {"clean_accuracy": clean, "sft_accuracy": noisy,
            "mean_clean_chars": float(np.mean([len(task.clean_chain(it.prompt)) for it in items])),
            "mean_sft_chars": float(np.mean([len(ex.response) for ex in sft]))}
