"""Reward functions by name, each wrapped so one bad response can never stop training.

Every reward has the signature `fn(item: PromptItem, response: str) -> float`:
    "builtin"         the built-in arithmetic task's checker (`#N` final answer)
    "math_verify"     math-verify equivalence; built-in task items take the checker's fast path
    "pkg.mod:func"    any importable function with that signature (a user's own reward)
`get_reward_fn` returns a `SafeReward`: an exception, a timeout or a non-finite value gives 0.0
and is counted in `.stats`, which the trainer logs.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

from erpo_mega.data.builtin_task import CHECKER_NAME, check_answer
from erpo_mega.data.types import PromptItem
from erpo_mega.plugins import import_callable
from erpo_mega.rewards.math_verify_reward import VerifyTimeout, math_verify_reward

RewardFn = Callable[[PromptItem, str], float]


class RewardTimeout(Exception):
    pass


@dataclass
class RewardStats:
    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    non_finite: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def builtin_reward(item: PromptItem, response: str) -> float:
    return check_answer(item.answer, response, float(item.meta.get("format_reward", 0.0)))


def math_verify_item_reward(item: PromptItem, response: str, timeout_s: int = 5) -> float:
    if item.meta.get("checker") == CHECKER_NAME:
        return builtin_reward(item, response)
    return math_verify_reward(response, item.answer, timeout_s=timeout_s)


class SafeReward:
    """Calls a reward function; failures become 0.0 and are counted, never raised.

    `timeout_s` puts a SIGALRM limit around each call (main thread only). It is left off for
    math-verify, which sets its own alarms and would cancel an outer one.
    """

    def __init__(self, fn: RewardFn, name: str, timeout_s: float | None = None):
        self.fn = fn
        self.name = name
        self.timeout_s = timeout_s
        self.stats = RewardStats()
        self.last_error: str | None = None

    def __call__(self, item: PromptItem, response: str) -> float:
        self.stats.calls += 1
        try:
            value = float(self._call_with_timeout(item, response))
        except (RewardTimeout, VerifyTimeout) as e:
            self.stats.timeouts += 1
            self.last_error = f"{type(e).__name__}: {e}"
            return 0.0
        except Exception as e:
            self.stats.errors += 1
            self.last_error = f"{type(e).__name__}: {e}"
            return 0.0
        if not math.isfinite(value):
            self.stats.non_finite += 1
            return 0.0
        return value

    def batch(self, items: list[PromptItem], responses: list[str]) -> list[float]:
        if len(items) != len(responses):
            raise ValueError(f"{len(items)} items but {len(responses)} responses")
        return [self(it, r) for it, r in zip(items, responses)]

    def _call_with_timeout(self, item: PromptItem, response: str) -> float:
        if not self.timeout_s or threading.current_thread() is not threading.main_thread():
            return self.fn(item, response)

        def on_alarm(signum, frame):
            raise RewardTimeout(f"reward '{self.name}' took more than {self.timeout_s}s")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.timeout_s)
        try:
            return self.fn(item, response)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _import_function(spec: str) -> RewardFn:
    return import_callable(spec, "reward", "'builtin', 'math_verify' or 'package.module:function'")


def get_reward_fn(name: str, timeout_s: float = 10.0) -> SafeReward:
    """The named reward, wrapped in `SafeReward`. `timeout_s` bounds each call."""
    if name == "builtin":
        return SafeReward(builtin_reward, name)
    if name == "math_verify":
        seconds = max(1, math.ceil(timeout_s))
        return SafeReward(lambda item, resp: math_verify_item_reward(item, resp, seconds), name)
    return SafeReward(_import_function(name), name, timeout_s=timeout_s)
