"""Tiny HF checkpoints built in-test (random weights, save_pretrained): no downloads."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_hf_config(arch: str = "qwen2", *, vocab: int = 96, hidden: int = 32, layers: int = 2,
                   heads: int = 4, kv_heads: int = 2, tie: bool = False, attention_bias: bool = False):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=256, rope_theta=5000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common, attention_bias=attention_bias)


def save_tiny_model(path: Path, arch: str = "qwen2", seed: int = 0, **kw) -> torch.nn.Module:
    """Random-weight HF model saved to `path`; returns the transformers model (fp32, eval)."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_hf_config(arch, **kw)
    cls = Qwen2ForCausalLM if arch == "qwen2" else LlamaForCausalLM
    model = cls(cfg).float().eval()
    with torch.no_grad():  # HF inits biases/norms to constants; randomise so names really matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return model


def save_tiny_tokenizer(path: Path, vocab: int = 96) -> None:
    """Word-level tokenizer over tokens '<t3>'..'<tN>' (ids 0-2: pad, bos, eos); no substring clashes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"<t{i}>": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(path))
