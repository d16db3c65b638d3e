"""The same client and weight pushes against a real SGLang server (GPU nodes with sglang only)."""

import importlib.util

import pytest
import torch

from erpo_mega.parallel.dist import free_port
from erpo_mega.rollout.launch import launch_sglang_server
from erpo_mega.weights.transport import push_weights
from tests.rollout.helpers import save_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                                                  reason="sglang is not installed")]


def test_real_sglang_generate_and_weight_paths(tmp_path):
    hf = save_tiny_model(tmp_path / "init", "qwen2", seed=0, hidden=64, heads=4, kv_heads=2)
    with launch_sglang_server(tmp_path / "init", port=free_port(), skip_tokenizer_init=True,
                              mem_fraction_static=0.2, log_path=tmp_path / "sglang.log",
                              extra_args=["--disable-cuda-graph"]) as handle:
        c = handle.client(timeout=120)
        outs = c.generate([[5, 17, 33, 8]], {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert len(outs[0].output_ids) == 4 and len(outs[0].output_token_logprobs) == 4
        with pytest.raises(Exception, match="HTTP 400"):
            c.generate([[1, 2]], {"seed": 1})
        new = save_tiny_model(tmp_path / "new", "qwen2", seed=1, hidden=64, heads=4, kv_heads=2)
        push_weights(list(new.state_dict().items()), [c], method="disk", disk_dir=tmp_path / "pushed",
                     weight_version="disk-1")
        got = torch.tensor(c.get_weights_by_name("model.norm.weight", truncate_size=1000))
        torch.testing.assert_close(got, new.state_dict()["model.norm.weight"].float(), atol=1e-2, rtol=1e-2)
        assert c.model_info()["weight_version"] == "disk-1"
        cuda_sd = [(n, t.cuda()) for n, t in hf.state_dict().items()]
        push_weights(cuda_sd, [c], method="tensor", weight_version="tensor-1")
        got = torch.tensor(c.get_weights_by_name("model.norm.weight", truncate_size=1000))
        torch.testing.assert_close(got, hf.state_dict()["model.norm.weight"].float(), atol=1e-2, rtol=1e-2)
