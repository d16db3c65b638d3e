"""The 7B job's twin on a real 2-node Slurm (issue 13): slurm/erpo_twin_cpu.sh, which differs from
slurm/erpo_7b.sh only in its variables, submitted twice with the real trainer.

Node n1 (NodeAddr 127.0.0.1) trains at TP 2 in bf16 from an HF MODEL_DIR; node n2 (NodeAddr
127.0.0.2, a name that resolves nowhere) runs two embedded engines (dp 1 each) and the router,
all behind the job's api key; weights go by the distributed (broadcast) path after every step;
a checkpoint is written every step. The second submission passes --resume and must continue the
step count from the checkpoint, push the restored weights before its first rollout, and leave
both engines on the last version.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.slurm.test_local_cluster_jobs import REPO, local_cluster, sbatch, wait_job

pytestmark = pytest.mark.slow  # two real training jobs on 2 cores: ~2-3 min


@pytest.fixture(scope="module")
def twin_env():
    yield from local_cluster(2)


def _rows(run_dir, split="train") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == split]


def _versions(log: str) -> dict[str, str]:
    return dict(re.findall(r"(engine\d@n2) weight_version=(\S+)", log))


def _stale_gap(base, trained_dir) -> float:
    """Mean |log p| difference between the base model and trained weights on fixed sequences:
    what the resumed run's train/rollout gap would be if its engines still served MODEL_DIR."""
    import torch
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, 95, (4, 24), generator=torch.Generator().manual_seed(0))
    def logp(model):
        with torch.no_grad():
            lsm = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
        return lsm.gather(-1, ids[:, 1:, None]).squeeze(-1)

    return (logp(base) - logp(trained)).abs().mean().item()


# A reward an untrained model earns about half the time, and a large step, so the weights really
# move: a resumed run whose engines kept MODEL_DIR's weights would show it in its logp gap.
OVERRIDES = ["reward=tests.e2e.plugins:even_length_reward", "train.optim.lr=3e-3"]


def test_twin_trains_syncs_both_engines_and_resumes(twin_env, tmp_path):
    from tests.rollout.helpers import save_tiny_model

    model_dir, run_dir = tmp_path / "hf", tmp_path / "run"
    base = save_tiny_model(model_dir, "qwen2", seed=5, vocab=96)  # the built-in task's character vocabulary (95) fits
    env = dict(twin_env, MODEL_DIR=str(model_dir), RUN_DIR=str(run_dir), PYTHON=sys.executable,
               PYTHONPATH=str(REPO))  # the reward plug-in lives in tests/

    out1 = tmp_path / "job1.out"
    job1 = sbatch(env, [f"--output={out1}", str(REPO / "slurm/erpo_twin_cpu.sh"), *OVERRIDES])
    state = wait_job(twin_env, job1, 600)
    log1 = out1.read_text()
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), log1[-6000:]
    # the topology: addresses from Slurm's NodeAddr, engines and router on node 2, TP 2 on node 1
    assert "plan node_addrs=127.0.0.1,127.0.0.2" in log1
    assert "plan node n1=train[ranks 0-1]" in log1
    assert re.search(r"plan node n2=engine0\[:\d+\] engine1\[:\d+\] router\[:\d+\]", log1)
    assert "--host 127.0.0.2" in log1 and "0.0.0.0" not in log1
    cfg = (run_dir / "config.yaml").read_text()
    assert "bf16: true" in cfg and "sync_method: distributed" in cfg and "tp: 2" in cfg
    assert f"init_from: {model_dir}" in cfg
    assert [r["step"] for r in _rows(run_dir)] == [1, 2]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    # every engine, not just the router's pick, serves the last sync
    assert _versions(log1) == {"engine0@n2": "2", "engine1@n2": "2"}, log1[-3000:]
    assert _rows(run_dir)[1]["rollout_weight_version"] == 1  # step 2 sampled from step 1's weights
    stale_gap = _stale_gap(base, run_dir / "final_hf")  # final_hf: the step-2 weights

    out2 = tmp_path / "job2.out"
    job2 = sbatch(env, [f"--output={out2}", str(REPO / "slurm/erpo_twin_cpu.sh"), "--resume", "train.steps=4",
                        *OVERRIDES])
    state = wait_job(twin_env, job2, 600)
    log2 = out2.read_text()
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), log2[-6000:]
    assert job2 != job1
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # continued, nothing redone or lost
    # the restored step-2 weights reached the engines before the resumed run's first rollout: its
    # train/rollout gap is that of freshly synced engines, far below what MODEL_DIR's would give
    assert rows[2]["rollout_weight_version"] == 2, rows[2]
    gap = rows[2]["rollout_logp_abs_diff_mean"]
    assert gap < 0.2 * stale_gap, (gap, stale_gap, [r["rollout_logp_abs_diff_mean"] for r in rows])
    assert _versions(log2) == {"engine0@n2": "4", "engine1@n2": "4"}, log2[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000004"
