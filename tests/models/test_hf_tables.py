"""The name/layout tables against hand-written layouts (no megatron process needed)."""

from __future__ import annotations

import pytest
import torch

from erpo_mega.config import ConfigError
from erpo_mega.models import hf_tables as T
from erpo_mega.models.config import ModelConfig


def _cfg(**kw) -> ModelConfig:
    base = dict(arch="qwen2", vocab_size=200, hidden_size=8, intermediate_size=6, num_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=1)
    base.update(kw)
    return ModelConfig(**base)


def _bw(cfg: ModelConfig, suffix: str) -> T.BoundWeight:
    (bw,) = [b for b in T.bound_weights(cfg) if b.mcore.endswith(suffix) and b.layer in (None, 0)]
    return bw


def test_qkv_bias_interleaves_query_groups_by_hand():
    # 4 query heads, 2 kv groups, head_dim 1: megatron wants [q0 q1 k0 v0 | q2 q3 k1 v1].
    cfg = _cfg()
    bw = _bw(cfg, "linear_qkv.bias")
    q = torch.tensor([10.0, 11.0, 12.0, 13.0])
    k = torch.tensor([20.0, 21.0])
    v = torch.tensor([30.0, 31.0])
    fused = T.hf_to_mcore(bw, [q, k, v], cfg)
    assert fused.tolist() == [10.0, 11.0, 20.0, 30.0, 12.0, 13.0, 21.0, 31.0]
    back = T.mcore_to_hf(bw, fused, cfg)
    assert [t.tolist() for t in back] == [q.tolist(), k.tolist(), v.tolist()]


def test_qkv_weight_rows_with_head_dim_two():
    # 2 heads, 1 kv group (MQA), head_dim 2: rows [q0a q0b q1a q1b k_a k_b v_a v_b].
    cfg = _cfg(hidden_size=4, num_attention_heads=2, num_key_value_heads=1, head_dim=2)
    bw = _bw(cfg, "linear_qkv.weight")
    q = torch.arange(4 * 4, dtype=torch.float32).reshape(4, 4)
    k = 100 + torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4)
    v = 200 + torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4)
    fused = T.hf_to_mcore(bw, [q, k, v], cfg)
    assert torch.equal(fused, torch.cat([q, k, v]))  # one group: plain concatenation
    cfg2 = _cfg(hidden_size=4, num_attention_heads=2, num_key_value_heads=2, head_dim=2)
    bw2 = _bw(cfg2, "linear_qkv.weight")
    k2 = 100 + torch.arange(4 * 4, dtype=torch.float32).reshape(4, 4)
    v2 = 200 + torch.arange(4 * 4, dtype=torch.float32).reshape(4, 4)
    fused2 = T.hf_to_mcore(bw2, [q, k2, v2], cfg2)
    expected = torch.cat([q[0:2], k2[0:2], v2[0:2], q[2:4], k2[2:4], v2[2:4]])
    assert torch.equal(fused2, expected)


def test_gate_up_and_its_tensor_parallel_split():
    cfg = _cfg()
    bw = _bw(cfg, "linear_fc1.weight")
    gate = torch.arange(6.0).reshape(6, 1).expand(6, 8)
    up = (100 + torch.arange(6.0)).reshape(6, 1).expand(6, 8)
    fused = T.hf_to_mcore(bw, [gate, up], cfg)
    assert fused[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 100, 101, 102, 103, 104, 105]
    # TP=2: rank 0 holds gate rows 0-2 then up rows 0-2; rank 1 the rest.
    shards = [T.tp_shard(bw, fused, r, 2) for r in range(2)]
    assert shards[0][:, 0].tolist() == [0, 1, 2, 100, 101, 102]
    assert shards[1][:, 0].tolist() == [3, 4, 5, 103, 104, 105]
    assert torch.equal(T.tp_merge(bw, shards), fused)


def test_row_and_column_splits_round_trip():
    cfg = _cfg()
    for suffix, dim in (("linear_proj.weight", 1), ("linear_fc2.weight", 1), ("linear_qkv.weight", 0)):
        bw = _bw(cfg, suffix)
        full = torch.randn(bw.mcore_shape)
        shards = [T.tp_shard(bw, full, r, 2) for r in range(2)]
        assert all(s.shape[dim] == full.shape[dim] // 2 for s in shards)
        assert torch.equal(T.tp_merge(bw, shards), full)


def test_vocab_is_padded_with_zero_rows_and_unpadded_exactly():
    cfg = _cfg()
    bw = _bw(cfg, "word_embeddings.weight")
    emb = torch.randn(200, 8)
    padded = T.hf_to_mcore(bw, [emb], cfg)
    assert padded.shape == (256, 8)
    assert torch.equal(padded[:200], emb) and torch.count_nonzero(padded[200:]) == 0
    assert torch.equal(T.mcore_to_hf(bw, padded, cfg)[0], emb)


def test_bound_names_follow_config():
    untied = {b.mcore for b in T.bound_weights(_cfg())}
    assert "output_layer.weight" in untied and "decoder.layers.1.self_attention.linear_qkv.bias" in untied
    tied = T.bound_weights(_cfg(arch="llama", tie_word_embeddings=True))
    names = {b.mcore for b in tied}
    assert "output_layer.weight" not in names
    assert not any(n.endswith("linear_qkv.bias") for n in names)
    hf = [n for b in tied for n in b.hf]
    assert "lm_head.weight" not in hf and "model.layers.1.mlp.up_proj.weight" in hf
    assert len(hf) == len(set(hf)) == 1 + 2 * 9 + 1  # embed, 9 per layer, final norm


def test_te_spec_names_map_to_local_names():
    assert (T.canonical_mcore_name("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight")
            == "decoder.layers.3.input_layernorm.weight")
    assert (T.canonical_mcore_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight")
            == "decoder.layers.0.pre_mlp_layernorm.weight")
    assert T.canonical_mcore_name("decoder.layers.0.mlp.linear_fc1.weight") == "decoder.layers.0.mlp.linear_fc1.weight"


def test_unsupported_configs_and_layouts_are_named():
    with pytest.raises(ConfigError, match="qkv_bias"):
        T.bound_weights(_cfg(arch="llama", qkv_bias=True))
    cfg = _cfg()
    T.validate_parallel_layout(cfg, 2, 2)
    with pytest.raises(ConfigError, match="num_attention_heads"):
        T.validate_parallel_layout(cfg, 3, 1)
    with pytest.raises(ConfigError, match="num_layers"):
        T.validate_parallel_layout(cfg, 1, 3)
    with pytest.raises(ConfigError, match="intermediate_size"):
        T.validate_parallel_layout(_cfg(intermediate_size=6, num_attention_heads=4), 4, 1)
