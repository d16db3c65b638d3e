"""TP2xPP2 layout numbers, and checkpoints that resume across layouts (one 4-process spawn).

Save at (TP, PP, DP) = (2, 2, 1) after step 1 (sharded optimizer format, resharded by the tool
before), load at (1, 1, 4), then save at (1, 1, 4)
after step 2 and load at (2, 2, 1). The reference is the uninterrupted run: parameters after
loading must equal the saved ones exactly, and the next step (loss, grad norm, parameters,
which exercises the AdamW moments and step counts) must match it at fp32 tolerance.
"""

import os

import pytest
import torch

from erpo_mega.parallel.spawn import run_distributed
from tests.megatron.cases import four_rank_layout_and_checkpoints
from tests.megatron.test_layouts import LOGP_TOL, LOSS_TOL, PARAM_TOL, assert_same_step

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return run_distributed(four_rank_layout_and_checkpoints, 4, str(tmp_path_factory.mktemp("ckpt")))


def test_tp2_pp2_matches_reference(four, single):
    reference = single["ref"]
    assert_same_step(reference, four[0]["layout"])
    m = four[0]["layout"]["metrics"]
    assert m["approx_kl"] == 0.0 and m["ratio_mean"] == 1.0
    for other in four[1:]:
        torch.testing.assert_close(other["layout"]["logp"], reference["logp"], atol=LOGP_TOL, rtol=0)


def test_load_at_other_layout_restores_parameters_exactly(four):
    r = four[0]["resume"]
    assert r["load_tp2pp2_at_dp4"] == 0.0
    assert r["load_dp4_at_tp2pp2"] == 0.0


def test_resumed_step_matches_uninterrupted_run(four):
    r = four[0]["resume"]
    for key in ("step2_loss", "step3_loss"):
        uninterrupted, resumed = r[key]
        assert resumed == pytest.approx(uninterrupted, abs=LOSS_TOL)
    assert r["step2_grad_norm"][1] == pytest.approx(r["step2_grad_norm"][0], rel=1e-5)
    # a shared/lost AdamW step counter or lost moments move parameters by ~lr (1e-3)
    assert r["step2_params"] < PARAM_TOL / 10
    assert r["step3_params"] < PARAM_TOL / 10


def test_sharded_optimizer_format_resumes_exactly_and_needs_reshard_elsewhere(four):
    r = four[0]["resume"]
    loss, resumed_loss, param_diff = r["step2_same_layout"]
    assert resumed_loss == pytest.approx(loss, abs=LOSS_TOL)
    assert param_diff < PARAM_TOL / 10
    err = r["sharded_elsewhere"]
    assert err.startswith("CheckpointError") and "sharded optimizer format" in err
    assert "erpo_mega.megatron.reshard" in err and "tp=2 pp=2" in err


def test_train_state_and_rng_round_trip(four):
    r = four[0]["resume"]
    assert r["extra"] == {"cursor": 17, "note": "after step 1"}
    assert r["extra_c"] == {"cursor": 18}
    assert r["step_c"] == 2
    before, after = r["rng"]
    assert torch.equal(before, after)


def test_damaged_checkpoints_fail_clearly_on_every_rank(four):
    victim = four[0]["victim"]
    for rank_result in four:
        errors = rank_result["errors"]
        assert errors["truncated"].startswith("CheckpointError")
        assert victim in errors["truncated"] and "truncated" in errors["truncated"]
        assert victim in errors["missing"] and "missing" in errors["missing"]
        assert "nowhere" in errors["no_checkpoint"] and "does not exist" in errors["no_checkpoint"]
    assert not os.path.exists(victim)
