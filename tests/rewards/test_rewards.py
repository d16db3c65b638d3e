import math
import threading

import pytest

from erpo_mega.data.builtin_task import ArithmeticTask
from erpo_mega.data.types import PromptItem
from erpo_mega.rewards import get_reward_fn, math_verify_reward
from erpo_mega.rewards.math_verify_reward import BadGoldAnswer


@pytest.mark.parametrize("response,answer,expected", [
    ("so the answer is \\boxed{1/2}", "0.5", 1.0),
    ("$\\boxed{\\frac{1}{2}}$", "1/2", 1.0),
    ("The answer is 0.5", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{\\sqrt 3}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0),
    ("\\boxed{1+x^2}", "x^2+1", 1.0),
    ("\\boxed{4}", "3", 0.0),
    ("\\boxed{0.51}", "1/2", 0.0),
    ("}{}}\\frac{ garbage", "3", 0.0),
    ("", "3", 0.0),
])
def test_math_verify_hand_examples(response, answer, expected):
    assert math_verify_reward(response, answer) == expected


def test_bad_gold_raises_but_safe_reward_counts_it():
    with pytest.raises(BadGoldAnswer):
        math_verify_reward("\\boxed{1}", "")
    fn = get_reward_fn("math_verify")
    assert fn(PromptItem("q", ""), "\\boxed{1}") == 0.0
    assert fn.stats.errors == 1 and fn.stats.calls == 1


def test_math_verify_works_off_the_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(math_verify_reward("\\boxed{2}", "2")))
    t.start()
    t.join()
    assert out == [1.0]


def test_builtin_fast_path_and_builtin_reward():
    item = ArithmeticTask().items("test", 1)[0]
    right = ArithmeticTask().clean_chain(item.prompt)
    wrong = right[: right.index("#")] + f"#{(int(item.answer) + 1) % 10}"
    for name in ("builtin", "math_verify"):
        fn = get_reward_fn(name)
        assert fn.batch([item, item, item], [right, wrong, "garbage"]) == [1.0, 0.0, 0.0]
    # the fast path does not go through math-verify: a boxed answer is not the task's format
    assert get_reward_fn("math_verify")(item, f"\\boxed{{{item.answer}}}") == 0.0


def user_reward(item, response):
    return 0.25 if response == item.answer else 0.0


def raising_reward(item, response):
    raise RuntimeError("boom")


def nan_reward(item, response):
    return math.nan


def slow_reward(item, response):
    while True:
        pass


def test_user_function_by_name():
    fn = get_reward_fn(f"{__name__}:user_reward")
    assert fn(PromptItem("q", "7"), "7") == 0.25


def test_failures_count_and_never_raise():
    item = PromptItem("q", "1")
    boom = get_reward_fn(f"{__name__}:raising_reward")
    assert boom(item, "x") == 0.0 and boom.stats.errors == 1 and "boom" in boom.last_error
    nan = get_reward_fn(f"{__name__}:nan_reward")
    assert nan(item, "x") == 0.0 and nan.stats.non_finite == 1
    slow = get_reward_fn(f"{__name__}:slow_reward", timeout_s=0.2)
    assert slow(item, "x") == 0.0 and slow.stats.timeouts == 1


def test_bad_names_are_clear():
    with pytest.raises(ValueError, match="expected 'builtin', 'math_verify'"):
        get_reward_fn("no_such_reward")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg'"):
        get_reward_fn("no_such_pkg:f")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        get_reward_fn(f"{__name__}:missing")
