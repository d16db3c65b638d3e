"""Multi-set evaluation through the real trainer and engine: two built-in sets, k = 4 samples each.

The trainer's avg@k / pass@k are recomputed here by brute force from the saved samples, and
`erpo-mega eval` prints them as a table, one row per set.
"""

import itertools
import json
import math

import pytest

from erpo_mega.observe.metrics import read_metrics

from .conftest import run_cli, tiny_config, write_config

pytestmark = pytest.mark.slow  # one train run and one eval run (two engine starts), ~60-90 s

SETS = {"val": {"split": "validation", "num_prompts": 5, "samples": 4, "temperature": 1.0},
        "tst": {"split": "test", "num_prompts": 3, "samples": 4, "temperature": 0.8, "pass_k": [1, 3, 4],
                "max_new_tokens": 8}}


def _brute_pass(row, k):
    subsets = list(itertools.combinations(row, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.fixture(scope="module")
def sets_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("evalsets") / "run"
    cfg = tiny_config(run_dir, reward="tests.e2e.plugins:even_length_reward",
                      **{"sft.steps": 0, "train.steps": 1, "eval.every": 0, "eval.sets": SETS,
                         "eval.save_samples": True, "checkpoint.every": 1})
    path = write_config(run_dir.parent / "cfg.yaml", cfg)
    run_cli("train", path)
    return run_dir, path


def test_two_sets_report_avg_and_pass_at_k_matching_brute_force(sets_run):
    run_dir, _ = sets_run
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1]
    for row in evals:
        samples = [json.loads(line) for line in
                   (run_dir / "eval_samples" / f"step_{row['step']:06d}.jsonl").read_text().splitlines()]
        for name, spec in SETS.items():
            mine = [s for s in samples if s["set"] == name]
            assert len(mine) == spec["num_prompts"] * 4
            matrix = [[s["reward"] >= 1.0 for s in mine if s["problem"] == p] for p in range(spec["num_prompts"])]
            assert row[f"{name}/avg@4"] == pytest.approx(sum(map(sum, matrix)) / len(mine))
            for k in spec.get("pass_k", [1, 2, 4]):
                want = sum(_brute_pass(r, k) for r in matrix) / len(matrix)
                assert row[f"{name}/pass@{k}"] == pytest.approx(want), (name, k)
            lens = sorted(s["response_len"] for s in mine)
            assert row[f"{name}/response_len_mean"] == pytest.approx(sum(lens) / len(lens))
            assert row[f"{name}/response_len_median"] == pytest.approx((lens[len(lens) // 2 - 1] + lens[len(lens) // 2]) / 2)
            assert row[f"{name}/truncated_fraction"] == pytest.approx(sum(s["truncated"] for s in mine) / len(mine))
            assert max(lens) <= spec.get("max_new_tokens", 12)
            assert 0.0 <= row[f"{name}/cdp_fraction"] <= 1.0
            assert math.isfinite(row[f"{name}/entropy_mean"]) and row[f"{name}/entropy_mean"] > 0
        assert "tst/pass@2" not in row and row["time/eval"] > 0
    # The samples differ between steps (the engine's weights changed) but the sets are the same problems.
    assert evals[0]["val/num_prompts"] == evals[1]["val/num_prompts"] == 5


def test_eval_command_prints_a_table_per_set(sets_run, tmp_path):
    run_dir, path = sets_run
    proc = run_cli("eval", path, "eval.save_samples=false")
    table = proc.stdout[: proc.stdout.index("{")]
    assert "avg@4" in table and "pass@3" in table and "CDP frac" in table
    lines = [line for line in table.splitlines() if line.strip().strip("│┃ ").startswith(("val", "tst"))]
    assert len(lines) == 2, table
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["val/samples"] == 4.0 and result["tst/num_prompts"] == 3.0


def test_entropy_and_cdp_fraction_match_a_transformers_forward(sets_run):
    """The final eval scores with the final weights: recompute every token's entropy at the set's
    temperature with transformers on final_hf, and the CDP share by brute force per problem."""
    import torch
    from transformers import AutoModelForCausalLM

    from erpo_mega.data.builtin_task import ArithmeticTask
    from erpo_mega.data.prompts import encode_prompt
    from erpo_mega.data.tokenizer import load_tokenizer
    from erpo_mega.run_config import load_run_config

    run_dir, _ = sets_run
    cfg = load_run_config(str(run_dir / "config.yaml"))
    tok = load_tokenizer(run_dir / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final_hf", torch_dtype=torch.float32).eval()
    task = ArithmeticTask(cfg.data.builtin, seed=cfg.data.seed)
    final = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "eval"][-1]
    samples = [json.loads(line) for line in (run_dir / "eval_samples" / "step_000001.jsonl").read_text().splitlines()]
    tau = cfg.algo.erpo.tau
    for name, spec in SETS.items():
        items = task.items(spec["split"], spec["num_prompts"])
        all_h, n_cdp = [], 0
        for p, item in enumerate(items):
            prompt = encode_prompt(item, tok, cfg.data)
            group = []
            for s in (s for s in samples if s["set"] == name and s["problem"] == p):
                ids = torch.tensor([prompt + s["response_ids"]])
                with torch.no_grad():
                    logits = model(ids).logits[0, len(prompt) - 1: -1].double() / spec["temperature"]
                logp = torch.log_softmax(logits, -1)
                group.append(-(logp.exp() * logp).sum(-1))
            h = torch.cat(group)
            z = (h - h.mean()) / (h.std(unbiased=False) + cfg.algo.erpo.eps)
            n_cdp += int((z > tau).sum())
            all_h.append(h)
        h = torch.cat(all_h)
        assert final[f"{name}/entropy_mean"] == pytest.approx(float(h.mean()), rel=1e-4, abs=1e-5), name
        assert final[f"{name}/cdp_fraction"] == pytest.approx(n_cdp / h.numel(), abs=1.5 / h.numel()), name
