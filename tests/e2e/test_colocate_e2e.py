"""`rollout.colocate: true` end to end: the trainer releases and resumes its embedded engine
(started with --enable-memory-saver) around every step, and rollouts still come from the
freshly synced weights (issue 13, defect 8; call order and refusal: tests/megatron/test_colocate.py)."""

import pytest

from erpo_mega.observe.metrics import read_metrics

from .conftest import run_cli, tiny_config, write_config

pytestmark = pytest.mark.slow  # one CLI run, ~30-60 s


def test_colocated_run_trains_and_syncs(tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(
        run_dir, **{"rollout.colocate": True, "sft.steps": 0, "train.steps": 2, "eval.every": 0,
                    "checkpoint.every": 1, "reward": "tests.e2e.plugins:even_length_reward"}))
    run_cli("train", cfg)
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert train[1]["rollout_weight_version"] == 1.0  # step 2 sampled from the weights pushed after step 1
    assert (run_dir / "checkpoints" / "iter_0000002").is_dir()  # saves ran with the trainer resident
    log = (run_dir / "engines" / "engine0.log").read_text()
    assert "Traceback" not in log
