"""Scaling merge, planning arithmetic and the NVML sampler's summary, on hand-made inputs."""

import json
import time

import pytest

from erpo_mega.bench import flops as F
from erpo_mega.bench import plan as P
from erpo_mega.bench.merge import main as merge_main
from erpo_mega.bench.nvml import NvmlSampler
from erpo_mega.bench.shapes import model_config
from erpo_mega.models.config import ModelConfig

ARCH = ModelConfig(arch="qwen2", vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)


def fake_bench(devices: int, nodes: int, step: float, tokens: float = 1000.0, mfu=None, peak=None) -> dict:
    phases = {p: {"seconds": step / 4, "tokens": tokens, "tokens_per_s": tokens / (step / 4),
                  "tokens_per_s_per_device": tokens / (step / 4) / devices}
              for p in ("rollout", "logprob", "train", "sync")}
    # consistent with the workload below: 4 x 2 samples of 8 + 8 tokens
    fwd = F.batch_flops_fwd(ARCH, [16] * 8)
    phases["rollout"].update(tokens=64, tokens_per_s_per_device=64 / (step / 4) / devices)
    phases["train"].update(tflops_per_device=3 * fwd / (step / 4) / devices / 1e12, mfu=mfu)
    phases["logprob"].update(tflops_per_device=fwd / (step / 4) / devices / 1e12, mfu=mfu and mfu / 2)
    phases["sync"].update(bytes=4.0 * ARCH.num_parameters(), bytes_per_s=4.0 * ARCH.num_parameters() / (step / 4))
    return {"layout": {"nodes": nodes, "devices": devices, "train_devices": devices, "engine_devices": devices,
                       "tp": 1, "pp": 1, "dp": devices, "placement": "colocated"},
            "phases": phases, "step_seconds": step, "overhead_seconds": 0.0,
            "step": {"tokens": tokens, "tokens_per_s": tokens / step, "tokens_per_s_per_device": tokens / step / devices},
            "model": {"name": "arch", "arch": ARCH.to_dict(), "params": ARCH.num_parameters()},
            "workload": {"prompts_per_step": 4, "samples_per_prompt": 2, "prompt_len": 8, "response_len": 8,
                         "micro_batch_tokens": 64, "logprob_passes": 1},
            "device": {"name": "cpu", "bf16": False, "peak_tflops": peak},
            "memory": {"max_rss_bytes": 2**30, "max_rss_above_baseline_bytes": 2**20, "max_cuda_allocated_bytes": None}}


def test_merge_speedup_and_efficiency(tmp_path, capsys):
    # 2 devices: 10 s per 1000 tokens; 4 devices: 6 s -> speed-up 10/6, ideal 2, efficiency 0.8333
    for name, b in (("big", fake_bench(4, 2, 6.0)), ("small", fake_bench(2, 1, 10.0))):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "bench.json").write_text(json.dumps(b))
    assert merge_main([str(tmp_path / "runs"), "--out", str(tmp_path / "scaling")]) == 0
    rows = json.loads((tmp_path / "scaling" / "scaling.json").read_text())
    assert [r["devices"] for r in rows] == [2, 4]
    assert rows[0]["speedup"] == 1.0 and rows[0]["efficiency"] == 1.0
    assert rows[1]["speedup"] == pytest.approx(10 / 6) and rows[1]["efficiency"] == pytest.approx(10 / 12)
    md = (tmp_path / "scaling" / "scaling.md").read_text()
    assert "1.67x" in md and "83%" in md and md in capsys.readouterr().out
    assert (tmp_path / "scaling" / "scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_merge_bad_input_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bench.json"
    bad.write_text("{not json")
    assert merge_main([str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert merge_main([str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err


def _target(**kw) -> P.Target:
    base = dict(model=ARCH, name="arch", nodes=1, devices_per_node=2, tp=1, pp=1, placement="colocated",
                rollout_nodes=0, prompts=4, samples=2, prompt_len=8, response_len=8, micro_batch_tokens=64,
                bf16=False, peak_tflops=None)
    base.update(kw)
    return P.Target(**base)


def test_plan_reproduces_its_own_rates_run_and_scales_by_hand():
    b = fake_bench(2, 1, 8.0)
    same = P.predict(b, _target())
    for p in ("rollout", "logprob", "train", "sync"):
        assert same["phases"][p]["seconds"] == pytest.approx(b["phases"][p]["seconds"]), p
    assert same["step_seconds"] == pytest.approx(8.0)
    # twice the devices, same work: every compute phase halves, sync does not
    two = P.predict(b, _target(nodes=2))
    assert two["phases"]["train"]["seconds"] == pytest.approx(1.0)
    assert two["phases"]["rollout"]["seconds"] == pytest.approx(1.0)
    assert two["phases"]["sync"]["seconds"] == pytest.approx(2.0)
    # twice the response length: rollout tokens double; train FLOPs by the count (len 8+16 vs 8+8)
    longer = P.predict(b, _target(response_len=16))
    assert longer["phases"]["rollout"]["seconds"] == pytest.approx(4.0)
    ratio = F.sequence_flops_fwd(ARCH, 24) / F.sequence_flops_fwd(ARCH, 16)
    assert longer["phases"]["train"]["seconds"] == pytest.approx(2.0 * ratio)


def test_plan_uses_mfu_against_the_target_peak():
    b = fake_bench(2, 1, 8.0, mfu=0.4, peak=100.0)
    pred = P.predict(b, _target(peak_tflops=1000.0))
    flops = 3 * F.batch_flops_fwd(ARCH, [16] * 8)
    assert pred["phases"]["train"]["seconds"] == pytest.approx(flops / (2 * 0.4 * 1000.0e12))


def test_plan_memory_hand_count_7b():
    cfg = model_config("qwen2.5-7b")
    t = _target(model=cfg, nodes=2, devices_per_node=8, tp=2, pp=1, micro_batch_tokens=8192, bf16=True)
    terms = {a: b for a, b, _ in P.memory_terms(t)}
    # per layer 233,046,016 matmul + 4,608 QKV bias + 7,168 norms = 233,057,792; 28 layers; emb + head
    # 2 x 152064 x 3584 = 1,089,994,752 -> shard (6,525,618,176 + 1,089,994,752) / 2 = 3,807,806,464
    shard = 3_807_806_464
    assert terms["weights"] == shard * 2 and terms["grads"] == shard * 4
    assert terms["optimizer"] == pytest.approx(shard * 12 / 8)  # dp = 16 / 2
    assert terms["activations"] == pytest.approx((10 + 12) * 3584 * 8192 * 28)
    assert terms["logits"] == 3 * 8192 * 76032 * 4


def test_plan_rejects_bad_layouts():
    with pytest.raises(P.PlanError, match="rollout-nodes"):
        P.predict(fake_bench(2, 1, 8.0), _target(placement="disaggregated", rollout_nodes=0))
    with pytest.raises(P.PlanError, match="tp\\*pp"):
        P.predict(fake_bench(2, 1, 8.0), _target(devices_per_node=3, tp=2))


def test_nvml_summary_from_injected_reader():
    reads = iter([[{"gpu": 0, "util_pct": 50.0, "mem_used_gib": 10.0, "mem_total_gib": 80.0, "power_w": 300.0}],
                  [{"gpu": 0, "util_pct": 100.0, "mem_used_gib": 30.0, "mem_total_gib": 80.0, "power_w": 500.0}]])

    def read():
        try:
            return next(reads)
        except StopIteration:
            raise RuntimeError("NVML gone") from None

    with NvmlSampler(interval_s=0.01, read=read) as s:
        time.sleep(0.2)
    out = s.summary()
    assert out["samples"] == 2
    g = out["gpus"][0]
    assert (g["util_pct_mean"], g["util_pct_max"], g["mem_used_gib_max"], g["power_w_mean"]) == (75.0, 100.0, 30.0, 400.0)
    assert NvmlSampler(enabled=False).summary() is None
