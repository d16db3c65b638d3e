"""The whole RL loop on CPU, as users run it: `erpo-mega train CONFIG` in a real process.

Checks real effects, not that code ran: the policy's weights changed, the engine served
rollouts from the new weights (weight_version advanced step by step), metrics are written
and finite, a SIGKILLed run resumes to the same next-step metrics, and a diverging run
stops with a clear error and a loadable checkpoint.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from erpo_mega.observe.metrics import read_metrics

from .conftest import REPO, cli_env, run_cli, tiny_config, write_config

FINITE_KEYS = ("reward_mean", "loss", "grad_norm", "entropy_mean", "cdp_fraction", "response_len_mean")


def _hf_tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    cfg = write_config(run_dir.parent / "cfg.yaml",
                       tiny_config(run_dir, reward="tests.e2e.plugins:even_length_reward"))
    proc = run_cli("train", cfg)
    return run_dir, proc


def test_smoke_metrics_written_and_finite(smoke_run):
    run_dir, proc = smoke_run
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        for k in FINITE_KEYS:
            assert isinstance(r[k], float) and math.isfinite(r[k]), (k, r[k])
        for phase in ("rollout", "logprob", "train", "sync"):
            assert r[f"time/{phase}"] > 0
    sft = [r for r in rows if r["split"] == "sft"]
    assert len(sft) == 3 and all(math.isfinite(r["nll"]) for r in sft)
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 3]
    assert list((run_dir / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 3


def test_smoke_engine_received_new_weights(smoke_run):
    run_dir, _ = smoke_run
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    # Step k's rollouts come from the weights synced after step k-1 (version k-1), step 1's
    # from the initial dir (no numeric version): each sync advanced the engine's weight_version.
    assert [r["rollout_weight_version"] for r in train[1:]] == [1.0, 2.0]
    assert all(r["sync_bytes"] > 0 for r in train)


def test_smoke_weights_changed_and_export_loads(smoke_run):
    run_dir, _ = smoke_run
    before = _hf_tensors(run_dir / "engine_init")
    after = _hf_tensors(run_dir / "final_hf")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) // 2, f"only {changed} changed"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final_hf")
    ids = torch.tensor([[1, 5, 6, 7]])
    logits = model(ids).logits
    assert torch.isfinite(logits).all()


def _wait_for(path: Path, proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.2)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    over = {"train.steps": 4, "eval.every": 0, "sft.steps": 2, "rollout.max_concurrency": 1,
            "reward": "tests.e2e.plugins:even_length_reward"}
    ref_dir = tmp_path / "ref"
    run_cli("train", write_config(tmp_path / "ref.yaml", tiny_config(ref_dir, **over)))

    run_dir = tmp_path / "killed"
    cfg = write_config(tmp_path / "killed.yaml", tiny_config(run_dir, **over))
    proc = subprocess.Popen([sys.executable, "-m", "erpo_mega.cli", "train", str(cfg)], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(run_dir / "checkpoints" / "iter_0000002", proc, timeout=400)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its engine, mid-run
        proc.wait()
    run_cli("train", cfg, "--resume")

    ref = {r["step"]: r for r in read_metrics(ref_dir / "metrics.jsonl") if r["split"] == "train"}
    got = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"}
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for k in ("reward_mean", "response_len_mean", "loss", "grad_norm", "entropy_mean", "cdp_fraction"):
            assert got[step][k] == pytest.approx(ref[step][k], rel=1e-5, abs=1e-6), (step, k)


def test_nan_loss_stops_with_clear_error_and_loadable_checkpoint(tmp_path):
    run_dir = tmp_path / "nan"
    cfg = write_config(tmp_path / "nan.yaml", tiny_config(
        run_dir, **{"algo.advantage": "tests.e2e.plugins:nan_on_second_step", "train.steps": 3, "eval.every": 0}))
    proc = run_cli("train", cfg, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "RL step 2: non-finite loss" in proc.stdout
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.endswith("iter_0000001")
    # the last checkpoint is intact: a resumed run loads it and continues from step 1
    proc = run_cli("train", cfg, "--resume", "algo.advantage=erpo", "train.steps=2")
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2]


def test_malformed_dataset_row_names_file_and_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"problem": "1+1", "solution": "\\\\boxed{2}"}\n{"problem": 5\n')
    cfg = tiny_config(tmp_path / "bad", **{"data.source": "jsonl", "data.path": str(data), "data.style": "math",
                                           "data.on_bad_row": "error", "sft.steps": 0})
    proc = run_cli("train", write_config(tmp_path / "bad.yaml", cfg), check=False)
    assert proc.returncode != 0
    assert f"{data}:2" in proc.stderr


def test_unknown_config_key_names_key_and_file(tmp_path):
    cfg = tiny_config(tmp_path / "x")
    cfg["algo"]["erpo"] = {"betta": 0.3}
    path = write_config(tmp_path / "typo.yaml", cfg)
    proc = run_cli("train", path, check=False)
    assert proc.returncode != 0
    assert "algo.erpo.betta" in proc.stderr and str(path) in proc.stderr


def test_eval_command_scores_the_latest_checkpoint(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    cfg = write_config(tmp_path / "eval.yaml", tiny_config(run_dir, reward="tests.e2e.plugins:even_length_reward"))
    proc = run_cli("eval", cfg, "--checkpoint", run_dir / "checkpoints" / "iter_0000002")
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["num_prompts"] == 8.0 and 0.0 <= result["accuracy"] <= 1.0
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "eval"]
    assert evals[-1]["step"] == 2  # scored at the checkpoint's step
