"""Query-chunked local attention equals megatron's DotProductAttention (issue 13, defect 5).

Same weights, same packed rows with a block-diagonal causal mask (three samples of
different lengths, GQA 4:2): outputs and input gradients of the chunked path (chunks of 8
and 5 tokens, so chunk edges fall inside samples) match megatron's own forward/backward.
"""

from __future__ import annotations

import torch

from erpo_mega.parallel.spawn import run_distributed


def _compare() -> dict:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from erpo_mega.megatron.batching import block_causal_mask
    from erpo_mega.models.builder import make_transformer_config
    from erpo_mega.models.chunked_attention import ChunkedDotProductAttention
    from erpo_mega.models.config import ModelConfig
    from erpo_mega.parallel.dist import init_distributed

    init_distributed(1, 1)
    cfg = ModelConfig(arch="qwen2", vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    tcfg = make_transformer_config(cfg)
    ref = DotProductAttention(tcfg, 1, AttnMaskType.causal, "self")
    seg = torch.tensor([0] * 9 + [1] * 13 + [2] * 7)
    mask = block_causal_mask(seg)
    s = seg.numel()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s, 1, 4, 16, generator=g)
    k = torch.randn(s, 1, 2, 16, generator=g)
    v = torch.randn(s, 1, 2, 16, generator=g)

    def run(module):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = module(qq, kk, vv, mask)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        return out.detach(), qq.grad, kk.grad, vv.grad

    results = {"ref": run(ref)}
    for chunk in (8, 5):
        mod = ChunkedDotProductAttention(tcfg, 1, AttnMaskType.causal, "self")
        mod.chunk_tokens = chunk
        assert mod._covered(q, mask, None, None)  # the chunked path, not megatron's fallback
        results[chunk] = run(mod)
    return results


def test_chunked_attention_matches_megatron_forward_and_backward():
    res = run_distributed(_compare, 1, timeout_s=300)[0]
    ref = res["ref"]
    assert ref[0].shape == (29, 1, 64)
    for chunk in (8, 5):
        for a, b in zip(ref, res[chunk]):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
