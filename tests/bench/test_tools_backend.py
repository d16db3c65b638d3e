"""tools/bench_weight_sync.py picks backend and engine by device; its random weights have the
model's HF names and shapes. The CUDA run itself is a GPU test."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from erpo_mega.models.config import ModelConfig
from erpo_mega.models.torch_llm import TorchLLM

REPO = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("bench_weight_sync", REPO / "tools" / "bench_weight_sync.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_backend_follows_device_on_cpu():
    tool = _tool()
    args = tool.parse([])
    assert (args.device, args.backend, args.engine) == (("cuda", "nccl", "sglang") if torch.cuda.is_available()
                                                        else ("cpu", "gloo", "embedded"))
    with pytest.raises(SystemExit):
        tool.parse(["--device", "cpu", "--backend", "nccl"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            tool.parse(["--device", "cuda"])


def test_random_weights_have_the_models_names_and_shapes():
    tool = _tool()
    cfg = ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    named = tool.random_weights(cfg, torch.bfloat16, "cpu")
    ref = TorchLLM(cfg).state_dict()
    assert [n for n, _ in named] == list(ref)
    assert all(t.shape == ref[n].shape and t.dtype == torch.bfloat16 for n, t in named)


@pytest.mark.gpu
def test_weight_sync_tool_runs_on_cuda(tmp_path):
    import json
    import subprocess

    if torch.cuda.device_count() < 1:
        pytest.skip("needs a GPU")
    methods = ["tensor"] + (["distributed"] if torch.cuda.device_count() >= 2 else [])
    out = tmp_path / "ws.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools/bench_weight_sync.py"), "--device", "cuda",
                           "--layers", "2", "--methods", *methods, "--repeats", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["bytes"] > 0 and r["bytes_per_s"] > 0 for r in rows)
