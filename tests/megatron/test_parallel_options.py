"""Parallel settings reachable from the YAML (issue 13, defect 6).

One 2-rank spawn compares each option with the plain run of the same layout, from the same
weights and batch: DP2 with overlapped grad reduce + param gather (two steps, so the second
forward consumes the deferred gather; the exported weights read after `sync_params`), and
TP2 with selective and full activation recompute. Options that cannot run here fail with a
ConfigError naming the field.
"""

from __future__ import annotations

import pytest
import torch

from erpo_mega.config import ConfigError
from erpo_mega.megatron.config import ParallelConfig
from erpo_mega.parallel.spawn import run_distributed
from tests.megatron.test_layouts import LOGP_TOL, LOSS_TOL, PARAM_TOL

pytestmark = pytest.mark.slow  # one 2-rank spawn, ~40-90 s on a loaded 2-core box


def _run(**options) -> dict:
    import gc

    import torch.distributed as dist

    from erpo_mega.megatron.worker import PolicyWorker
    from erpo_mega.weights.export import iter_hf_weights
    from tests.megatron.cases import LOSS, OPTIM, TEMPERATURE, _first_batch
    from tests.megatron.helpers import MODEL, gather_full, set_full_weights

    gc.collect()
    worker = PolicyWorker().setup(MODEL, ParallelConfig(micro_batch_tokens=40, **options), OPTIM, bf16=False)
    model = worker.modules.unwrapped()[0]
    set_full_weights(model)
    batch, logp, _, _ = _first_batch(worker)
    metrics = [worker.train_step(batch, LOSS, temperature=TEMPERATURE)]
    logp2, _ = worker.compute_logprobs(batch, temperature=TEMPERATURE)
    metrics.append(worker.train_step(batch, LOSS, temperature=TEMPERATURE))
    worker.sync_params()
    exported = {n: t.clone() for n, t in iter_hf_weights(worker.model_chunks, MODEL)}
    return {"logp": logp, "logp2": logp2, "metrics": metrics, "params": gather_full(model),
            "exported": exported if dist.get_rank() == 0 else None}


def _cases() -> dict:
    from erpo_mega.megatron.setup import build_policy
    from erpo_mega.parallel.dist import init_distributed
    from tests.megatron.cases import OPTIM
    from tests.megatron.helpers import MODEL

    out = {}
    init_distributed(1, 1)
    out["dp2"] = _run()
    out["dp2_overlap"] = _run(overlap_grad_reduce=True, overlap_param_gather=True)
    init_distributed(2, 1)
    out["tp2"] = _run(tp=2)
    out["tp2_selective"] = _run(tp=2, recompute="selective")
    out["tp2_full"] = _run(tp=2, recompute="full")
    try:
        build_policy(MODEL, ParallelConfig(tp=2, sequence_parallel=True), OPTIM, bf16=False)
        out["sp_error"] = "built"
    except ConfigError as e:
        out["sp_error"] = str(e)
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_cases, 2, timeout_s=900)[0]


def _assert_same(ref: dict, got: dict) -> None:
    torch.testing.assert_close(got["logp"], ref["logp"], atol=LOGP_TOL, rtol=0)
    torch.testing.assert_close(got["logp2"], ref["logp2"], atol=LOGP_TOL, rtol=0)
    for a, b in zip(ref["metrics"], got["metrics"]):
        assert b["loss"] == pytest.approx(a["loss"], abs=LOSS_TOL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for k in ref["params"]:
        torch.testing.assert_close(got["params"][k], ref["params"][k], atol=PARAM_TOL, rtol=0)
    for k in ref["exported"]:
        torch.testing.assert_close(got["exported"][k], ref["exported"][k], atol=PARAM_TOL, rtol=0)


def test_overlapped_grad_reduce_and_param_gather_match_plain_dp(results):
    _assert_same(results["dp2"], results["dp2_overlap"])
    # the second step really moved the weights (so a stale gather would show)
    assert results["dp2"]["metrics"][1]["loss"] != results["dp2"]["metrics"][0]["loss"]


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_recompute_matches_plain_tp2(results, mode):
    _assert_same(results["tp2"], results[f"tp2_{mode}"])


def test_sequence_parallel_without_transformer_engine_is_a_clear_error(results):
    assert "sequence_parallel" in results["sp_error"] and "TransformerEngine" in results["sp_error"]


@pytest.mark.parametrize("kwargs, field", [
    ({"context_parallel": 2}, "context_parallel"),
    ({"sequence_parallel": True}, "sequence_parallel"),  # tp = 1
    ({"overlap_param_gather": True}, "overlap_param_gather"),  # without overlap_grad_reduce
    ({"recompute": "some"}, "recompute"),
])
def test_invalid_parallel_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        ParallelConfig(**kwargs)
    assert field in str(e.value)


def test_parallel_settings_load_from_yaml_dict():
    cfg = ParallelConfig.from_dict({"tp": 2, "recompute": "full", "recompute_num_layers": 2,
                                    "overlap_grad_reduce": True, "overlap_param_gather": True,
                                    "sequence_parallel": True})
    assert (cfg.recompute, cfg.recompute_num_layers, cfg.overlap_param_gather, cfg.sequence_parallel) == \
        ("full", 2, True, True)
