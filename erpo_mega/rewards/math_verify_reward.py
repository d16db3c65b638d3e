"""Correctness reward for free-form math answers, via HuggingFace `math-verify`.

The response's answer is extracted by math-verify (a `\\boxed{}` first, then any LaTeX or plain
expression) and compared with the reference by value (`1/2` == `0.5` == `\\frac{1}{2}`).
math-verify guards parsing and comparison with `signal.alarm`, which only works in the main
thread; elsewhere its timeouts are switched off (it then relies on the caller's process-level
limits), instead of failing every call.
"""

from __future__ import annotations

import threading

from math_verify import parse, verify
from math_verify.errors import TimeoutException


class VerifyTimeout(Exception):
    """math-verify gave up on parsing or comparing within its time limit."""


class BadGoldAnswer(ValueError):
    """The reference answer itself could not be parsed."""


def _timeout(seconds: int) -> int | None:
    return seconds if threading.current_thread() is threading.main_thread() else None


def parse_gold(answer: str, timeout_s: int = 5):
    """Parse a reference answer; bare answers are read as if boxed, so `1,000` or `x^2` parse as math."""
    text = answer.strip()
    try:
        if "\\boxed" not in text and "$" not in text:
            parsed = parse("\\boxed{" + text + "}", parsing_timeout=_timeout(timeout_s), raise_on_error=True)
            if parsed:
                return parsed
        parsed = parse(text, parsing_timeout=_timeout(timeout_s), raise_on_error=True)
    except TimeoutException as e:
        raise VerifyTimeout(f"parsing the reference answer {answer!r} timed out") from e
    if not parsed:
        raise BadGoldAnswer(f"cannot parse reference answer {answer!r}")
    return parsed


def math_verify_reward(response: str, answer: str, timeout_s: int = 5) -> float:
    """1.0 when the response's final answer equals `answer` mathematically, else 0.0.

    Raises VerifyTimeout / BadGoldAnswer / other errors; `SafeReward` turns them into a counted 0.
    """
    gold = parse_gold(answer, timeout_s)
    try:
        pred = parse(response, parsing_timeout=_timeout(timeout_s), raise_on_error=True)
        if not pred:
            return 0.0
        ok = verify(gold, pred, timeout_seconds=_timeout(timeout_s), raise_on_error=True)
    except TimeoutException as e:
        raise VerifyTimeout(f"math-verify timed out after {timeout_s}s") from e
    return 1.0 if ok else 0.0
