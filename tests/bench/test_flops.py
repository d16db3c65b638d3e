"""The FLOP count against hand counts (two shapes), torch's own FLOP counter, and published sizes."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from erpo_mega.bench import flops as F
from erpo_mega.bench.peaks import lookup_peak, resolve_peak
from erpo_mega.bench.shapes import model_config
from erpo_mega.models.config import ModelConfig
from erpo_mega.models.torch_llm import TorchLLM

TINY = ModelConfig(arch="qwen2", vocab_size=64, hidden_size=128, intermediate_size=384, num_layers=3,
                   num_attention_heads=4, num_key_value_heads=2)


def test_tiny_hand_count():
    # per layer: Q 128*128 + K,V 2*128*64 + O 128*128 + MLP 3*128*384 = 16384+16384+16384+147456 = 196608
    # 3 layers = 589824; head 128*64 = 8192; matmul weights per token 598016; x2 FLOPs = 1196032
    assert F.flops_per_token_fwd(TINY) == 1_196_032
    # s=10: 55 causal pairs, 4 * q(128) * 55 = 28160 per layer, x3 layers = 84480
    assert F.attention_flops_fwd(TINY, 10) == 84_480
    assert F.sequence_flops_fwd(TINY, 10) == 11_960_320 + 84_480
    assert F.train_flops(TINY, [10, 10]) == 3 * 2 * 12_044_800
    assert F.train_flops(TINY, [10], recompute=True) == 4 * 12_044_800


def test_qwen25_7b_hand_count():
    cfg = model_config("qwen2.5-7b")
    # per layer: Q 3584*3584=12845056, K+V 2*3584*512=3670016, O 12845056, MLP 3*3584*18944=203685888
    # = 233046016; x28 = 6525288448; head 3584*152064 = 544997376; sum 7070285824; x2:
    assert F.flops_per_token_fwd(cfg) == 14_140_571_648
    # 4096 tokens: pairs 4096*4097/2 = 8390656; 4 * 3584 * 8390656 * 28 layers
    assert F.attention_flops_fwd(cfg, 4096) == 3_368_076_443_648  # = 4 * 3584 * 8390656 * 28
    # the published parameter count of Qwen2.5-7B (7.62B): matmuls + embedding + QKV biases + norms
    assert cfg.num_parameters() == 7_615_616_512


def test_published_sizes():
    assert model_config("qwen2.5-1.5b").num_parameters() == 1_543_714_304  # tied embeddings
    assert model_config("llama3.1-8b").num_parameters() == 8_030_261_248
    with pytest.raises(KeyError, match="known: qwen2.5-0.5b"):
        model_config("gpt-5")


def test_matmul_part_matches_torch_flop_counter():
    """torch counts every mm/addmm of a real forward; its SDPA on CPU is not counted, so the
    independent total is exactly our per-token term times the length."""
    cfg = ModelConfig(arch="qwen2", vocab_size=95, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = TorchLLM(cfg)
    ids = torch.randint(0, 95, (1, 10))
    with FlopCounterMode(display=False) as fc:
        model(ids)
    assert fc.get_total_flops() == 10 * F.flops_per_token_fwd(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()


def test_tied_head_changes_params_not_flops():
    a = ModelConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2, tie_word_embeddings=False)
    b = ModelConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2, tie_word_embeddings=True)
    assert F.flops_per_token_fwd(a) == F.flops_per_token_fwd(b)
    assert a.num_parameters() - b.num_parameters() == 1000 * 64


def test_mfu_and_peaks():
    assert F.tflops_per_device(989.4e12 * 2 * 0.5, 1.0, 2) == pytest.approx(494.7)
    assert F.mfu(494.7, 989.4) == pytest.approx(0.5)
    assert F.mfu(1.0, None) is None
    assert lookup_peak("NVIDIA H100 80GB HBM3") == 989.4
    assert lookup_peak("NVIDIA H200") == 989.4
    assert lookup_peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert lookup_peak("NVIDIA B200") == 2250.0
    assert lookup_peak("NVIDIA GB200") == 2450.0
    assert lookup_peak("cpu") is None
    assert resolve_peak(100.0, "cpu", True) == (100.0, "--peak-tflops")
