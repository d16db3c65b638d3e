"""Faults the trainer must name instead of training on silently (issue 14), as real runs."""

import os
import subprocess
import sys

from erpo_mega.observe.metrics import read_metrics

from .conftest import REPO, cli_env, tiny_config, write_config


def test_engine_returning_untempered_logprobs_stops_at_step_one(tmp_path):
    # The embedded engine honours SGLang's SGLANG_RETURN_ORIGINAL_LOGPROB: with it set, its
    # log-probs are of softmax(z) while sampling (and the trainer) use softmax(z / 0.25).
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(
        run_dir, **{"sft.steps": 0, "train.steps": 2, "rollout.temperature": 0.25, "eval.every": 0,
                    "eval.num_prompts": 2, "checkpoint.every": 0}))
    env = {**cli_env(), "SGLANG_RETURN_ORIGINAL_LOGPROB": "1"}
    proc = subprocess.run([sys.executable, "-m", "erpo_mega.cli", "train", str(cfg)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "RL step 1" in out and "SGLANG_RETURN_ORIGINAL_LOGPROB" in out and "rollout.max_logp_gap" in out
    assert "Traceback" not in out
    assert not [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert not (run_dir / "checkpoints").exists() or not os.listdir(run_dir / "checkpoints")
