"""Per-set scoring without engines: set_metrics on a hand-made rollout, score_entropy with a stand-in
policy (empty responses skipped, CDP share by brute force), and the table."""

import io

import pytest
import torch
from rich.console import Console

from erpo_mega.algo.config import ERPOConfig
from erpo_mega.data.types import PromptItem
from erpo_mega.orchestration.eval_config import EvalSetConfig
from erpo_mega.orchestration.evaluate import EvalSet, eval_table, score_entropy, set_metrics
from erpo_mega.orchestration.rollout_step import Rollout


def _rollout(rewards, lens, truncated):
    n = len(rewards)
    return Rollout(items=[PromptItem("p", "1")] * n, group_ids=[i // 2 for i in range(n)], prompt_ids=[[1]] * n,
                   response_ids=[[5] * k for k in lens], rollout_logp=[[0.0] * k for k in lens], texts=[""] * n,
                   rewards=rewards, truncated=truncated)


def test_set_metrics_names_and_values():
    es = EvalSet("aime", EvalSetConfig(samples=2), [PromptItem("a", "1"), PromptItem("b", "2")], [[1], [1]])
    m = set_metrics(es, _rollout([1.0, 0.0, 0.0, 0.5], [3, 5, 7, 9], [False, False, False, True]))
    assert m["aime/avg@2"] == 0.25 and m["aime/pass@1"] == 0.25 and m["aime/pass@2"] == 0.5
    assert m["aime/reward_mean"] == pytest.approx(1.5 / 4) and m["aime/truncated_fraction"] == 0.25
    assert m["aime/response_len_median"] == 6.0
    legacy = EvalSet("", EvalSetConfig(samples=1), [PromptItem("a", "1")], [[1]])
    assert set(set_metrics(legacy, _rollout([1.0], [4], [False]))) >= {"accuracy", "avg@1", "pass@1", "num_prompts"}


class _Policy:
    """Returns fixed per-token entropies for the rows it is asked about (records what it saw)."""

    def __init__(self, table):
        self.table = table
        self.seen = None

    def compute_logprobs(self, batch, temperature):
        self.seen = (batch.response_ids, temperature)
        width = batch.max_response_len
        ent = torch.zeros(batch.num_samples, width)
        for i, r in enumerate(batch.response_ids):
            ent[i, : len(r)] = torch.tensor(self.table[tuple(r)])
        return torch.zeros_like(ent), ent


def test_score_entropy_skips_empty_responses_and_counts_cdps():
    table = {(1, 2, 3): [0.1, 0.1, 2.0], (4, 5): [0.1, 0.2], (6,): [0.3]}
    policy = _Policy(table)
    got = score_entropy(policy, [[9]] * 4, [[1, 2, 3], [], [4, 5], [6]], [0, 0, 1, 1], 0.7, ERPOConfig(tau=1.0))
    assert policy.seen == ([[1, 2, 3], [4, 5], [6]], 0.7)
    flat = [0.1, 0.1, 2.0, 0.1, 0.2, 0.3]
    assert got["entropy_mean"] == pytest.approx(sum(flat) / 6)
    # group 0: [0.1, 0.1, 2.0] -> only 2.0 has z > 1; group 1: [0.1, 0.2, 0.3] -> z = 1.22 for 0.3
    assert got["cdp_fraction"] == pytest.approx(2 / 6)
    none = score_entropy(policy, [[9]], [[]], [0], 1.0, ERPOConfig())
    assert all(v != v for v in none.values())  # NaN: nothing to score


def test_table_has_a_row_per_set_and_union_of_k_columns():
    metrics = {"aime/avg@4": 0.1, "aime/pass@1": 0.1, "aime/pass@4": 0.3, "aime/num_prompts": 30.0,
               "gsm/avg@1": 0.8, "gsm/pass@1": 0.8, "gsm/entropy_mean": 0.5, "time/eval": 12.0}
    buf = io.StringIO()
    Console(file=buf, width=200).print(eval_table(metrics))
    text = buf.getvalue()
    header = next(line for line in text.splitlines() if "avg@1" in line)
    assert header.index("avg@1") < header.index("avg@4") < header.index("pass@1") < header.index("pass@4")
    rows = [line for line in text.splitlines() if line.strip("│┃ ").startswith(("aime", "gsm"))]
    assert len(rows) == 2 and "0.300" in rows[0] and "0.500" in rows[1] and "time" not in text.split("┃ set")[1]
