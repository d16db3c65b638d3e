"""`erpo-mega bench` on the tiny config on CPU, as users run it (a real process, real engine).

The numbers in bench.json must agree with each other and with counts made here by hand:
tokens / seconds = tokens/s, phase seconds + overhead = step, forced lengths held, FLOPs
and sync bytes equal to what the model's shape says.
"""

import json
import math

import pytest
import yaml

from erpo_mega.bench import flops as F
from erpo_mega.models.config import ModelConfig

from ..e2e.conftest import run_cli

P, G, PL, RL = 2, 3, 10, 7  # prompts, samples per prompt, prompt and response length


def _cfg(run_dir):
    return {"run_dir": str(run_dir), "seed": 5,
            "model": {"tokenizer": "builtin",
                      "arch": {"arch": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
                               "num_attention_heads": 4, "num_key_value_heads": 2,
                               "max_position_embeddings": 64}},
            "data": {"source": "builtin", "builtin_train_size": 20, "builtin_eval_size": 4},
            "rollout": {"prompts_per_step": P, "samples_per_prompt": G, "max_concurrency": 3},
            "train": {"optim": {"lr": 1e-3, "warmup_steps": 0, "total_steps": 10},
                      "parallel": {"micro_batch_tokens": 128}},
            "bench": {"prompt_len": PL, "response_len": RL}}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    cfg = d / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(d / "unused")))
    proc = run_cli("bench", cfg, "--steps", "2", "--warmup", "1", "--out", d / "out", "--peak-tflops", "2.5",
                   "rollout.temperature=0.9")
    return d / "out", proc


@pytest.mark.slow
def test_bench_json_is_consistent(bench_run):
    out, proc = bench_run
    b = json.loads((out / "bench.json").read_text())
    assert "erpo-mega bench" in proc.stdout and "rollout" in proc.stdout  # the console table
    assert (out / "bench.md").read_text().count("|") > 40
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"

    n = P * G
    assert b["workload"]["forced_lengths_held"] is True
    ph = b["phases"]
    assert ph["rollout"]["tokens"] == n * RL
    assert ph["train"]["tokens"] == ph["logprob"]["tokens"] == n * (PL + RL)
    for name, p in ph.items():
        assert p["seconds"] > 0, name
        if p["tokens"]:
            assert p["tokens"] / p["seconds"] == pytest.approx(p["tokens_per_s"], rel=1e-9), name
            assert p["tokens_per_s_per_device"] == pytest.approx(p["tokens_per_s"] / p["devices"])
    total = sum(p["seconds"] for p in ph.values())
    assert b["overhead_seconds"] >= 0
    assert total + b["overhead_seconds"] == pytest.approx(b["step_seconds"], rel=1e-9)
    assert b["overhead_seconds"] < 0.3 * b["step_seconds"]
    timed = [s for s in b["steps"] if not s["warmup"]]
    assert len(timed) == 2 and len(b["steps"]) == 3
    assert b["step_seconds"] == pytest.approx(sum(s["step_seconds"] for s in timed) / 2)
    assert b["step"]["tokens_per_s"] == pytest.approx(n * (PL + RL) / b["step_seconds"])
    assert b["step"]["trainer_idle_fraction"] == pytest.approx(ph["rollout"]["seconds"] / b["step_seconds"])

    # FLOPs: 2 * weights met per token + causal attention, x3 for the train pass (hand count of this shape:
    # vocab is the builtin tokenizer's, read back from the run)
    arch = ModelConfig.from_dict(b["model"]["arch"])
    per_tok = 2 * (2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64) + 32 * arch.vocab_size)
    assert b["model"]["flops_per_token_fwd"] == per_tok == F.flops_per_token_fwd(arch)
    s = PL + RL
    seq = s * per_tok + 2 * 4 * 32 * (s * (s + 1) // 2)
    assert ph["train"]["flops"] == 3 * n * seq and ph["logprob"]["flops"] == n * seq
    tf = ph["train"]["flops"] / ph["train"]["seconds"] / 1 / 1e12
    assert ph["train"]["tflops_per_device"] == pytest.approx(tf)
    assert ph["train"]["mfu"] == pytest.approx(tf / 2.5)
    assert b["device"]["peak_source"] == "--peak-tflops"

    # weight sync moves every parameter once, fp32 on CPU
    assert b["model"]["params"] == arch.num_parameters()
    assert ph["sync"]["bytes"] == 4 * arch.num_parameters()
    assert ph["sync"]["bytes_per_s"] == pytest.approx(ph["sync"]["bytes"] / ph["sync"]["seconds"])

    lay = b["layout"]
    assert (lay["nodes"], lay["devices"], lay["tp"], lay["pp"], lay["dp"], lay["engines"], lay["placement"]) == \
        (1, 1, 1, 1, 1, 1, "colocated")
    assert b["nvml"] is None  # no NVIDIA GPU here
    assert b["memory"]["max_rss_bytes"] > 50 * 2**20 and b["memory"]["max_cuda_allocated_bytes"] is None
    assert all(math.isfinite(x["step_seconds"]) for x in b["steps"])


def test_bench_bad_input_is_a_clear_error(tmp_path, capsys):
    """Refused before anything starts: exit code 2 and one line naming the key or flag."""
    from erpo_mega.bench.cli import main_bench

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tmp_path / "run")))
    assert main_bench([str(cfg), "bench.response_len=0"]) == 2
    err = capsys.readouterr().err
    assert "bench.response_len" in err and "Traceback" not in err
    assert main_bench([str(cfg), "bench.model=gpt-9"]) == 2
    err = capsys.readouterr().err
    assert "bench.model" in err and "gpt-9" in err and "qwen2.5-7b" in err
    with pytest.raises(SystemExit) as exc:
        main_bench([str(cfg), "--steps", "0"])
    assert exc.value.code == 2 and "--steps" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was written
