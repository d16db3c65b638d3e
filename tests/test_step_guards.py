"""Guards of one RL step (issue 14): empty responses, all-truncated mini-batches, the
updates_per_step split, the engine/trainer log-prob gap, and sampling truncation in RL."""

import math

import pytest
import torch

from erpo_mega.algo.registry import get_advantage_estimator
from erpo_mega.config import ConfigError
from erpo_mega.megatron.batching import PolicyBatch
from erpo_mega.orchestration.step_guards import (
    RolloutProblem,
    check_rollout_logp_gap,
    drop_empty_responses,
    minibatch_indices,
    rollout_logp_gap,
)
from erpo_mega.run_config import RunConfig, load_run_config
from erpo_mega.trainer import Trainer


class RecordingWorker:
    """Stands in for the Megatron worker in `Trainer._update`: records the mini-batches it is given."""

    def __init__(self):
        self.calls = []

    def train_step(self, batch, loss_cfg, temperature, loss_fn):
        n_tok = float(batch.effective_loss_mask().sum())
        self.calls.append(([list(p) for p in batch.prompt_ids], n_tok))
        i = len(self.calls)
        return {"loss": float(i), "grad_norm": 10.0 * i, "rollout_logp_abs_diff_max": float(i),
                "num_tokens": n_tok}


def _trainer(**over) -> Trainer:
    t = Trainer(load_run_config(None, [f"{k}={v}" for k, v in over.items()] + ["rollout.prompts_per_step=2",
                                                                               "rollout.samples_per_prompt=2"]))
    t.worker = RecordingWorker()
    return t


def _batch(lengths, loss_mask=None) -> PolicyBatch:
    n, width = len(lengths), max(lengths)
    return PolicyBatch(prompt_ids=[[i + 1] for i in range(n)], response_ids=[[5] * L for L in lengths],
                       advantages=torch.zeros(n, width), old_logp=torch.zeros(n, width), loss_mask=loss_mask)


def test_minibatches_are_k_nonempty_and_balanced():
    assert minibatch_indices(4, 3) == [[0, 1], [2], [3]]  # ceil(4/3)=2 per batch left the 3rd empty
    assert minibatch_indices(12, 5) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9], [10, 11]]
    assert minibatch_indices(3, 1) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="updates_per_step=3"):
        minibatch_indices(2, 3)


def test_updates_per_step_runs_k_updates_and_averages_over_them():
    t = _trainer(**{"algo.updates_per_step": 3})
    m = t._update(_batch([2, 3, 1, 4]), loss_fn=None)
    assert [c[0] for c in t.worker.calls] == [[[1], [2]], [[3]], [[4]]]  # 3 updates, none empty
    assert m["updates_run"] == 3.0 and m["updates_skipped"] == 0.0
    assert m["loss"] == pytest.approx((1 + 2 + 3) / 3)  # was (1 + 2) / 3 with an update missing
    assert m["grad_norm"] == pytest.approx(20.0)
    assert m["rollout_logp_abs_diff_max"] == 3.0  # a max over updates, not a mean
    assert m["num_tokens"] == 10.0  # a count: summed


def test_all_truncated_minibatch_is_skipped_and_reported():
    mask = torch.zeros(4, 4, dtype=torch.bool)  # drop_truncated and every response cut
    t = _trainer()
    m = t._update(_batch([2, 3, 1, 4], loss_mask=mask), loss_fn=None)
    assert t.worker.calls == [] and m["updates_run"] == 0.0 and m["updates_skipped"] == 1.0
    assert "loss" not in m and "grad_norm" not in m
    mask[3, :4] = True  # with k=2 the first mini-batch is all masked, the second is not
    t = _trainer(**{"algo.updates_per_step": 2})
    m = t._update(_batch([2, 3, 1, 4], loss_mask=mask), loss_fn=None)
    assert [c[0] for c in t.worker.calls] == [[[3], [4]]]
    assert m["updates_run"] == 1.0 and m["updates_skipped"] == 1.0 and m["loss"] == 1.0


def test_empty_responses_are_dropped_not_fatal():
    # group 0: one empty of three; group 1: one empty of two (leaves a lone sample: dropped too)
    ro = {"prompt_ids": [[1], [1], [1], [4], [4]], "response_ids": [[7, 8], [], [9], [6], []],
          "rollout_logp": [[-1.0, -2.0], [], [-0.5], [-0.1], []], "rewards": [1.0, 0.0, 0.0, 1.0, 0.0],
          "group_ids": [0, 0, 0, 1, 1], "truncated": [False, False, True, False, False], "weight_version": 3.0}
    out, n_empty, n_dropped = drop_empty_responses(ro)
    assert (n_empty, n_dropped) == (2, 3)
    assert out["response_ids"] == [[7, 8], [9]] and out["rewards"] == [1.0, 0.0]
    assert out["group_ids"] == [0, 0] and out["truncated"] == [False, True] and out["weight_version"] == 3.0
    assert drop_empty_responses(out) == (out, 0, 0)
    # what remains goes through the advantage estimator, which refuses a zero-length row
    est = get_advantage_estimator("erpo")
    mask = torch.tensor([[1, 1], [1, 0]]).bool()
    adv, _ = est(torch.tensor(out["rewards"]), torch.rand(2, 2), mask, torch.tensor(out["group_ids"]),
                 RunConfig().algo.erpo)
    assert torch.isfinite(adv).all()
    with pytest.raises(ValueError, match="empty response"):
        est(torch.tensor(ro["rewards"]), torch.rand(5, 2), torch.tensor([[1, 1], [0, 0], [1, 0], [1, 0], [0, 0]]).bool(),
            torch.tensor(ro["group_ids"]), RunConfig().algo.erpo)


def test_logp_gap_of_an_untempered_engine_stops_the_run():
    # The trainer scores tokens under softmax(z / T); an engine returning log-probs of softmax(z)
    # (SGLANG_RETURN_ORIGINAL_LOGPROB=1) gives another number for the same token.
    torch.manual_seed(0)
    logits = 3.0 * torch.randn(6, 5, 40)
    tokens = torch.randint(0, 40, (6, 5))
    T = 0.6
    trainer = torch.log_softmax(logits / T, -1).gather(-1, tokens[..., None])[..., 0]
    engine_ok = trainer + 1e-6
    engine_untempered = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0, 3:] = False
    assert rollout_logp_gap(trainer, engine_ok, mask) < 1e-5
    gap = rollout_logp_gap(trainer, engine_untempered, mask)
    expected = float((trainer - engine_untempered)[mask].abs().mean())
    assert gap == pytest.approx(expected) and gap > 0.1
    check_rollout_logp_gap(rollout_logp_gap(trainer, engine_ok, mask), 0.1, T, 1)
    with pytest.raises(RolloutProblem, match="SGLANG_RETURN_ORIGINAL_LOGPROB") as e:
        check_rollout_logp_gap(gap, 0.1, T, 1)
    assert f"{gap:.4f}" in str(e.value) and "rollout.max_logp_gap" in str(e.value)
    check_rollout_logp_gap(gap, None, T, 1)  # switched off
    assert math.isfinite(gap)


@pytest.mark.parametrize("override,key", [("rollout.top_p=0.9", "rollout.top_p"),
                                          ("rollout.top_k=20", "rollout.top_k")])
def test_truncated_sampling_is_refused_for_rl(override, key):
    with pytest.raises(ConfigError, match=key) as e:
        load_run_config(None, [override])
    assert "log-probs" in str(e.value)
    load_run_config(None, ["rollout.top_p=1.0", "rollout.top_k=-1"])


def test_more_updates_than_samples_is_a_config_error():
    with pytest.raises(ConfigError, match="algo.updates_per_step"):
        load_run_config(None, ["rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
                               "algo.updates_per_step=5"])
