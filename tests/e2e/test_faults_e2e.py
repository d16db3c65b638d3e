"""Faults the trainer must name instead of training on silently (issue 14), as real runs."""

import os
import subprocess
import sys

import pytest

from erpo_mega.observe.metrics import read_metrics

from .conftest import REPO, cli_env, run_cli, tiny_config, write_config


@pytest.mark.slow  # one short CLI run: ~30 s idle
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


@pytest.mark.slow  # three short runs: ~60-90 s on 2 cores
def test_damaged_latest_checkpoint_named_then_resume_falls_back_when_asked(tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(
        run_dir, **{"sft.steps": 0, "train.steps": 2, "eval.every": 0, "eval.num_prompts": 2,
                    "checkpoint.every": 1, "checkpoint.keep_last": 3}))
    run_cli("train", cfg)
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000002"
    first = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    data = max((ckpts / "iter_0000002").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:100])  # a half-written latest iteration
    # a new run over it is refused; --resume names the damaged file in one line
    proc = run_cli("train", cfg, check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    proc = run_cli("train", cfg, "--resume", "train.steps=3", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{data.name} is truncated or damaged" in proc.stderr and "checkpoint.resume_fallback=true" in proc.stderr
    assert "Traceback" not in proc.stderr
    # asked to fall back: resumes from iter_0000001, redoes step 2, goes on to step 3
    run_cli("train", cfg, "--resume", "train.steps=3", "checkpoint.resume_fallback=true")
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == first[0]["loss"]  # the row before the fallback point is kept
    assert (ckpts / "latest").read_text().strip() == "iter_0000003"
