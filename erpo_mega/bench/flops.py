"""Model FLOPs of the policy, counted per sample at its real length (docs/benchmarks.md).

Dense decoder (Qwen2/Llama): per token and layer the matmuls Q (h x q), K and V (h x kv each,
GQA), O (q x h) and the SwiGLU MLP (three h x f); the LM head (h x V) once per token whether
or not it is tied to the embedding (tying changes the parameter count, not the work); the
embedding lookup, norms, biases, rotary, softmax and the SwiGLU product are not counted (they
are < 1% and not matmuls). A multiply-add is 2 FLOPs.

Attention scores and the weighted sum are counted for the causal pairs only: a sequence of
s tokens has s(s+1)/2 (query, key) pairs, each costing 2*q FLOPs for Q.K^T and 2*q for A.V.
Backward is twice forward, so a training pass is 3x forward; activation recompute (not used
by this stack today) would add one more forward and is reported separately as hardware FLOPs.
"""

from __future__ import annotations

from collections.abc import Iterable

from erpo_mega.models.config import ModelConfig


def matmul_params_per_layer(cfg: ModelConfig) -> int:
    """Weights a token meets in one layer's matmuls (biases and norms excluded)."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    q = cfg.num_attention_heads * cfg.kv_channels
    kv = cfg.num_key_value_heads * cfg.kv_channels
    return h * q + 2 * h * kv + q * h + 3 * h * f


def flops_per_token_fwd(cfg: ModelConfig) -> int:
    """Forward FLOPs per token without the attention-score term (which depends on length)."""
    return 2 * (cfg.num_layers * matmul_params_per_layer(cfg) + cfg.hidden_size * cfg.vocab_size)


def attention_flops_fwd(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of causal Q.K^T and A.V for one sequence of `seq_len` tokens, all layers."""
    q = cfg.num_attention_heads * cfg.kv_channels
    pairs = seq_len * (seq_len + 1) // 2
    return cfg.num_layers * 4 * q * pairs


def sequence_flops_fwd(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of one sequence (prompt + response) of `seq_len` tokens."""
    return seq_len * flops_per_token_fwd(cfg) + attention_flops_fwd(cfg, seq_len)


def batch_flops_fwd(cfg: ModelConfig, seq_lens: Iterable[int]) -> int:
    """Forward FLOPs of a batch of sequences, each at its own length (packing adds none)."""
    return sum(sequence_flops_fwd(cfg, s) for s in seq_lens)


def train_flops(cfg: ModelConfig, seq_lens: Iterable[int], recompute: bool = False) -> int:
    """Forward + backward (3x forward); with `recompute`, one more forward (hardware FLOPs)."""
    return (4 if recompute else 3) * batch_flops_fwd(cfg, seq_lens)


def tflops_per_device(flops: float, seconds: float, devices: int) -> float | None:
    if seconds <= 0 or devices <= 0:
        return None
    return flops / seconds / devices / 1e12


def mfu(tflops: float | None, peak_tflops: float | None) -> float | None:
    """Achieved / peak, or None when either is unknown."""
    if tflops is None or not peak_tflops:
        return None
    return tflops / peak_tflops
