"""Component benchmarks: collectives' bus bandwidth (nccl-tests' factors, a real 2-rank gloo
run) and the train-only bench (log-prob + update on synthetic responses, no engine)."""

import json

import pytest
import yaml

from erpo_mega.bench import flops as F
from erpo_mega.bench.collectives import _rank_main, bus_factor
from erpo_mega.models.config import ModelConfig
from erpo_mega.parallel.spawn import run_distributed

from ..e2e.conftest import run_cli
from .test_bench_cli import PL, RL, G, P, _cfg


def test_bus_factors_are_nccl_tests():
    assert bus_factor("all_reduce", 8) == pytest.approx(2 * 7 / 8)
    assert bus_factor("all_gather", 4) == pytest.approx(3 / 4)
    assert bus_factor("reduce_scatter", 2) == pytest.approx(1 / 2)
    assert bus_factor("broadcast", 16) == 1.0
    with pytest.raises(ValueError, match="all_to_all"):
        bus_factor("all_to_all", 2)


def test_two_rank_gloo_collectives():
    rows = run_distributed(_rank_main, 2, [0.25], ["all_reduce", "all_gather", "reduce_scatter", "broadcast"], 2, 1)
    r0 = rows[0]
    assert [r["op"] for r in r0] == ["all_reduce", "all_gather", "broadcast"]  # gloo has no reduce_scatter
    for r in r0:
        assert r["bytes"] == 2**18 and r["ranks"] == 2 and r["backend"] == "gloo" and r["seconds"] > 0
        assert r["algbw_gbps"] == pytest.approx(r["bytes"] / r["seconds"] / 1e9)
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * bus_factor(r["op"], 2))
    assert [r["seconds"] for r in rows[1]] == [r["seconds"] for r in r0]  # both report the slowest rank


def test_train_only_bench(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tmp_path / "run")))
    run_cli("bench", cfg, "bench.only=train", "--steps", "1", "--warmup", "1")
    b = json.loads((tmp_path / "run" / "bench.json").read_text())
    ph = b["phases"]
    assert not ph["rollout"]["ran"] and ph["rollout"]["seconds"] == 0 and not ph["sync"]["ran"]
    assert ph["train"]["ran"] and ph["train"]["tokens"] == P * G * (PL + RL)
    arch = ModelConfig.from_dict(b["model"]["arch"])
    assert ph["train"]["flops"] == 3 * F.batch_flops_fwd(arch, [PL + RL] * (P * G))
    assert sum(p["seconds"] for p in ph.values()) + b["overhead_seconds"] == pytest.approx(b["step_seconds"])
    assert not (tmp_path / "run" / "engines" / "engine0.log").exists()  # no engine was started
