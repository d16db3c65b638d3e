import numpy as np
import pytest

from erpo_mega.config import ConfigError, from_dict
from erpo_mega.data.builtin_task import (
    ArithmeticTask,
    ArithmeticTaskConfig,
    check_answer,
    parse_final_answer,
    sanity_check,
    split_of,
)
from erpo_mega.data.types import PromptItem


def test_solve_left_to_right_mod_10():
    task = ArithmeticTask()
    # 7+3=10->0; 0*2=0; 0-4=-4->6
    assert task.clean_chain("7+3*2-4") == "7+3=0;0*2=0;0-4=6;#6"
    assert task.clean_chain("9*9") == "9*9=1;#1"


def test_solve_with_precedence_and_modulus():
    task = ArithmeticTask(ArithmeticTaskConfig(precedence=True, modulus=100))
    # 3*2=6; 7+6=13; 13-4=9
    assert task.clean_chain("7+3*2-4") == "3*2=6;7+6=13;13-4=9;#9"
    # 5-8*9: 8*9=72; 5-72=-67 -> 33 (mod 100)
    assert task.answer("5-8*9") == 33


@pytest.mark.parametrize("response,expected", [
    ("7+3=0;0*2=0;0-4=6;#6", 1.0),
    ("#6", 1.0),
    ("#6 \n", 1.0),
    ("7+3=0;#0", 0.0),          # wrong answer
    ("7+3=0;0*2=0;0-4=6;", 0.0),  # no answer marker
    ("#6;#6", 0.0),             # two markers
    ("#6;0+1", 0.0),            # text after the answer (e.g. truncated run-on)
    ("#x", 0.0),
    ("", 0.0),
])
def test_checker_hand_examples(response, expected):
    item = PromptItem("7+3*2-4", "6")
    assert ArithmeticTask().score(item, response) == expected


def test_format_reward_only_for_well_formed_wrong_answers():
    assert check_answer("6", "#5", format_reward=0.1) == 0.1
    assert check_answer("6", "5", format_reward=0.1) == 0.0
    assert check_answer("6", "#6", format_reward=0.1) == 1.0
    assert parse_final_answer("a;#12") == 12


def test_items_deterministic_per_seed():
    a = ArithmeticTask(seed=3).items("train", 50)
    b = ArithmeticTask(seed=3).items("train", 50)
    c = ArithmeticTask(seed=4).items("train", 50)
    assert [i.prompt for i in a] == [i.prompt for i in b]
    assert [i.prompt for i in a] != [i.prompt for i in c]
    assert [i.prompt for i in ArithmeticTask(seed=3).items("train", 20)] == [i.prompt for i in a[:20]]
    assert len({i.prompt for i in a}) == 50


def test_splits_disjoint_across_seeds():
    cfg = ArithmeticTaskConfig(min_ops=1, max_ops=2)
    prompts = {s: set() for s in ("train", "validation", "test")}
    for seed in (0, 1):
        task = ArithmeticTask(cfg, seed=seed)
        for split in prompts:
            prompts[split] |= {i.prompt for i in task.items(split, 200)}
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    assert all(split_of(p, cfg.eval_fraction) == "test" for p in prompts["test"])


def test_answers_match_independent_evaluation():
    task = ArithmeticTask(seed=1)
    for item in task.items("test", 100):
        tokens = item.prompt
        value = int(tokens[0])  # default knobs: single-digit operands, left to right, mod 10
        for op, digit in zip(tokens[1::2], tokens[2::2]):
            value = {"+": value + int(digit), "-": value - int(digit), "*": value * int(digit)}[op] % 10
        assert item.answer == str(value)


def test_difficulty_knob_changes_length_and_operands():
    easy = ArithmeticTask(ArithmeticTaskConfig(min_ops=1, max_ops=1)).items("train", 100)
    hard = ArithmeticTask(ArithmeticTaskConfig(min_ops=5, max_ops=6, max_operand=99, modulus=100)).items("train", 100)
    assert {i.meta["num_ops"] for i in easy} == {1}
    assert {i.meta["num_ops"] for i in hard} <= {5, 6}
    assert np.mean([len(i.prompt) for i in hard]) > 3 * np.mean([len(i.prompt) for i in easy])
    assert any(int(i.answer) >= 10 for i in hard)


def test_too_few_prompts_is_a_clear_error():
    task = ArithmeticTask(ArithmeticTaskConfig(min_ops=1, max_ops=1, max_operand=1, ops="+"))
    with pytest.raises(ValueError, match="distinct 'test' prompts"):
        task.items("test", 50)


def test_config_validation_names_key():
    with pytest.raises(ConfigError, match="min_ops"):
        from_dict(ArithmeticTaskConfig, {"min_ops": 5, "max_ops": 2})
    with pytest.raises(ConfigError, match="ops"):
        from_dict(ArithmeticTaskConfig, {"ops": "+/"})


def test_sft_chains_noisy_redundant_and_mostly_correct():
    task = ArithmeticTask(seed=0)
    report = sanity_check(task, n=400, noise=0.05, redundancy=0.4)
    assert report["clean_accuracy"] == 1.0
    assert 0.93 <= report["sft_accuracy"] < 1.0
    assert report["mean_sft_chars"] > 1.2 * report["mean_clean_chars"]
    exact = task.sft_examples(200, noise=0.0, redundancy=0.0, seed=5)
    assert all(ex.response == task.clean_chain(ex.item.prompt) for ex in exact)
    again = task.sft_examples(200, noise=0.05, redundancy=0.4, seed=5)
    assert [e.response for e in again] == [e.response for e in task.sft_examples(200, seed=5)]
