"""Tiny random HuggingFace Qwen2/Llama models written to disk: the independent reference."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 200  # not a multiple of 128: exercises vocabulary padding

ARCH_KWARGS = {
    # Qwen2 style: QKV bias, untied output layer, GQA 4:2.
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False),
    # Llama-3 style: no bias, tied embeddings, rope theta 500000, GQA 8:2 (4 query heads per group).
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True),
}


def make_hf_model(arch: str, seed: int = 0):
    import transformers

    kwargs = dict(ARCH_KWARGS[arch], vocab_size=VOCAB, max_position_embeddings=128, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "qwen2":
        config = transformers.Qwen2Config(**kwargs)
        cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.LlamaConfig(**kwargs)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    with torch.no_grad():  # non-trivial norms and biases so a swapped tensor shows up
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def save_hf_model(arch: str, path: Path, seed: int = 0, max_shard_size: str = "100KB") -> Path:
    """Write a tiny model as several safetensors shards (exercises the index path)."""
    model = make_hf_model(arch, seed)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def sample_tokens(seed: int = 1, batch: int = 2, seq: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)
