"""Named model shapes (published HF configs) for random-init benchmarks and planning.

Only the numbers that decide FLOPs, bytes and memory are kept; `model_config(name)` turns a
name into the `ModelConfig` the rest of the stack builds.
"""

from __future__ import annotations

from erpo_mega.models.config import ModelConfig

# name -> (arch, hidden, intermediate, layers, heads, kv_heads, vocab, tied, rope_theta)
SHAPES: dict[str, tuple] = {
    "qwen2.5-0.5b": ("qwen2", 896, 4864, 24, 14, 2, 151936, True, 1e6),
    "qwen2.5-1.5b": ("qwen2", 1536, 8960, 28, 12, 2, 151936, True, 1e6),
    "qwen2.5-7b": ("qwen2", 3584, 18944, 28, 28, 4, 152064, False, 1e6),
    "qwen2.5-32b": ("qwen2", 5120, 27648, 64, 40, 8, 152064, False, 1e6),
    "qwen2.5-72b": ("qwen2", 8192, 29568, 80, 64, 8, 152064, False, 1e6),
    "llama3.1-8b": ("llama", 4096, 14336, 32, 32, 8, 128256, False, 5e5),
    "llama3.1-70b": ("llama", 8192, 28672, 80, 64, 8, 128256, False, 5e5),
}


def model_config(name: str, max_position_embeddings: int = 32768) -> ModelConfig:
    """The `ModelConfig` of a named shape; unknown names list the known ones."""
    key = name.lower()
    if key not in SHAPES:
        raise KeyError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    arch, h, f, L, heads, kv, vocab, tied, theta = SHAPES[key]
    return ModelConfig(arch=arch, vocab_size=vocab, hidden_size=h, intermediate_size=f, num_layers=L,
                       num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                       rope_theta=theta, max_position_embeddings=max_position_embeddings,
                       bos_token_id=0, eos_token_id=1, pad_token_id=1)
