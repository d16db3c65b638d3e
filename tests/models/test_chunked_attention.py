"""Query-chunked local attention equals megatron's DotProductAttention (issue 13, defect 5).

Same weights, same packed rows with a block-diagonal causal mask (three samples of
different lengths, GQA 4:2): outputs and input gradients of the chunked path (chunks of 8
and 5 tokens, so chunk edges fall inside samples) match megatron's own forward/backward on
the dense mask, both when given that dense mask and when given the compact segment mask
(per-chunk masks built from segment ids), and on the fallback path (row shorter than a
chunk: the segment mask is expanded for megatron's forward). A dispatch-mode probe checks
that the segment-mask path never allocates an S x S tensor at S = 1024.
"""

from __future__ import annotations

import torch

from erpo_mega.parallel.spawn import run_distributed


def _compare() -> dict:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from erpo_mega.megatron.batching import block_causal_mask
    from erpo_mega.models.builder import make_transformer_config
    from erpo_mega.models.chunked_attention import ChunkedDotProductAttention, segment_mask
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
    compact = segment_mask(seg)
    assert compact.shape == (1, 1, 1, s)
    for chunk in (8, 5):
        mod = ChunkedDotProductAttention(tcfg, 1, AttnMaskType.causal, "self")
        mod.chunk_tokens = chunk
        assert mod._covered(q, mask, None, None)  # the chunked path, not megatron's fallback
        assert mod._covered(q, compact, None, None)
        results[chunk] = run(mod)
        mask = compact
        results[f"seg{chunk}"] = run(mod)
        mask = block_causal_mask(seg)
    mod = ChunkedDotProductAttention(tcfg, 1, AttnMaskType.causal, "self")  # default 2048-token chunks
    assert not mod._covered(q, compact, None, None)
    mask = compact
    results["seg_fallback"] = run(mod)
    return results


def _largest_tensors() -> dict:
    """Chunked attention on the segment mask at S = 1024 (chunks of 128): every tensor any
    op produces in forward and backward, by shape."""
    from megatron.core.transformer.enums import AttnMaskType
    from torch.utils._python_dispatch import TorchDispatchMode

    from erpo_mega.models.builder import make_transformer_config
    from erpo_mega.models.chunked_attention import ChunkedDotProductAttention, segment_mask
    from erpo_mega.models.config import ModelConfig
    from erpo_mega.parallel.dist import init_distributed

    init_distributed(1, 1)
    cfg = ModelConfig(arch="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)
    mod = ChunkedDotProductAttention(make_transformer_config(cfg), 1, AttnMaskType.causal, "self")
    mod.chunk_tokens = 128
    s = 1024
    seg = torch.repeat_interleave(torch.arange(5), torch.tensor([300, 200, 250, 270, 4]))
    q = torch.randn(s, 1, 2, 16, requires_grad=True)
    k = torch.randn(s, 1, 1, 16, requires_grad=True)
    v = torch.randn(s, 1, 1, 16, requires_grad=True)
    shapes: list[tuple] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    shapes.append(tuple(t.shape))
            return out

    with Record():
        out = mod(q, k, v, segment_mask(seg))
        out.sum().backward()
    chunked = list(shapes)
    shapes.clear()
    mod.chunk_tokens = 1 << 30  # the probe has teeth: megatron's own path (fallback) does build S x S
    with Record():
        mod(q, k, v, segment_mask(seg)).sum().backward()
    return {"shapes": chunked, "fallback_shapes": shapes, "s": s, "grad_ok": bool(torch.isfinite(q.grad).all())}


def test_chunked_attention_matches_megatron_forward_and_backward():
    res = run_distributed(_compare, 1, timeout_s=300)[0]
    ref = res["ref"]
    assert ref[0].shape == (29, 1, 64)
    for name in (8, 5, "seg8", "seg5", "seg_fallback"):
        for a, b in zip(ref, res[name]):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_segment_mask_path_never_allocates_s_by_s():
    res = run_distributed(_largest_tensors, 1, timeout_s=300)[0]
    s, shapes = res["s"], res["shapes"]
    assert res["grad_ok"] and len(shapes) > 50
    def s_by_s(shapes):
        return [sh for sh in shapes if sum(d >= s for d in sh) >= 2 or torch.Size(sh).numel() >= s * s]

    # the biggest are one chunk's scores: 2 heads x 128 queries x up to 1024 keys
    assert max(torch.Size(sh).numel() for sh in shapes) == 2 * 128 * s
    assert not s_by_s(shapes)
    assert s_by_s(res["fallback_shapes"])
