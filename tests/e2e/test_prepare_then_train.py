"""The README's two commands at tiny scale: `erpo-mega prepare-data` (train set and an eval set from
local files shaped like GSM8K and AIME 2024), then `erpo-mega train` on them with `eval.sets`:
prompts from files through the chat template, rewards by math-verify against the prepared answers."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from erpo_mega.observe.metrics import read_metrics
from erpo_mega.rewards.math_verify_reward import math_verify_reward

from .conftest import run_cli, tiny_config, write_config

pytestmark = pytest.mark.slow  # two prepare-data processes and one train run, ~40-70 s


def test_prepare_then_train_with_eval_sets(tmp_path):
    raw = tmp_path / "raw"
    (raw / "main").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(
        [{"question": f"What is {a} plus {b}?", "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b:,}"}
         for a in range(1, 5) for b in (7, 900)]), raw / "main" / "train-00000-of-00001.parquet")
    (raw / "aime.jsonl").write_text("".join(json.dumps(
        {"id": i, "problem": f"Find x if x - {i} = 0.", "solution": "", "answer": f"00{i}"}) + "\n" for i in (1, 2, 3)))
    data = tmp_path / "data"
    run_cli("prepare-data", "gsm8k", "--input", raw, "--split", "train", "--out", data / "gsm8k_train.parquet")
    run_cli("prepare-data", "aime24", "--input", raw / "aime.jsonl", "--out", data / "aime24.jsonl")

    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, **{
        "data": {"source": "parquet", "path": str(data / "gsm8k_{split}.parquet"), "split": "train", "style": "math",
                 "prompt_template": "{prompt} Answer in \\boxed{}.", "max_prompt_len": 120},
        "sft.steps": 0, "train.steps": 1, "eval.every": 0, "eval.save_samples": True,
        "eval.sets": {"aime": {"path": str(data / "aime24.jsonl"), "samples": 2, "temperature": 1.0}},
        "rollout.max_new_tokens": 10})
    run_cli("train", write_config(tmp_path / "cfg.yaml", cfg))

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1]
    final = [r for r in rows if r["split"] == "eval"][-1]
    assert final["aime/num_prompts"] == 3 and final["aime/samples"] == 2
    samples = [json.loads(line) for line in (run_dir / "eval_samples" / "step_000001.jsonl").read_text().splitlines()]
    assert [s["answer"] for s in samples] == ["1", "1", "2", "2", "3", "3"]  # normalised by prepare-data
    for s in samples:  # scored by math-verify against the prepared answer (an error scores 0, as in SafeReward)
        try:
            want = math_verify_reward(s["response"], s["answer"])
        except Exception:
            want = 0.0
        assert s["reward"] == want
    assert final["aime/avg@2"] == pytest.approx(sum(s["reward"] >= 1 for s in samples) / 6)
