"""`erpo-mega bench` with the policy on a CUDA GPU: allocator peaks, the peak table's MFU and the
NVML sampler must all be filled in (they are null on CPU)."""

import json

import pytest
import torch
import yaml

from erpo_mega.bench.peaks import lookup_peak

from ..e2e.conftest import run_cli
from .test_bench_cli import _cfg

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_cuda_fills_memory_mfu_and_nvml(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tmp_path / "run")))
    run_cli("bench", cfg, "--steps", "2", "--warmup", "1", "bench.prompt_len=64", "bench.response_len=32")
    b = json.loads((tmp_path / "run" / "bench.json").read_text())
    name = torch.cuda.get_device_name(0)
    assert b["device"]["name"] == name and b["device"]["bf16"] is True
    assert b["memory"]["max_cuda_allocated_bytes"] > 0
    assert b["nvml"] and b["nvml"][0]["gpus"] and b["nvml"][0]["samples"] >= 1
    peak = lookup_peak(name)
    if peak:
        tr = b["phases"]["train"]
        assert tr["mfu"] == pytest.approx(tr["tflops_per_device"] / peak)
