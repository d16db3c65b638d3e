"""Model architecture config shared by the Megatron policy, the embedded engine and conversion.

One dataclass describes a decoder-only transformer of the Qwen2/Qwen2.5 and Llama-3
families. It reads and writes HuggingFace `config.json` so a checkpoint directory is the
single source of truth for the architecture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from erpo_mega.config import ConfigError, bounds, choices, from_dict, to_dict

ARCHITECTURES = ("qwen2", "llama")
_HF_ARCH_CLASS = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclass
class ModelConfig:
    arch: str = field(default="qwen2", metadata=choices(*ARCHITECTURES))
    vocab_size: int = field(default=512, metadata=bounds(gt=0))
    hidden_size: int = field(default=64, metadata=bounds(gt=0))
    intermediate_size: int = field(default=128, metadata=bounds(gt=0))
    num_layers: int = field(default=2, metadata=bounds(gt=0))
    num_attention_heads: int = field(default=4, metadata=bounds(gt=0))
    num_key_value_heads: int = field(default=2, metadata=bounds(gt=0))
    head_dim: int | None = field(default=None, metadata=bounds(gt=0))
    rope_theta: float = field(default=10000.0, metadata=bounds(gt=0))
    rms_norm_eps: float = field(default=1e-6, metadata=bounds(gt=0))
    max_position_embeddings: int = field(default=2048, metadata=bounds(gt=0))
    qkv_bias: bool | None = None  # None: the family default (Qwen2 yes, Llama no)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.qkv_bias is None:
            self.qkv_bias = self.arch == "qwen2"
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError("hidden_size", f"{self.hidden_size} is not divisible by "
                                  f"num_attention_heads={self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_key_value_heads", f"num_attention_heads={self.num_attention_heads} is not "
                              f"divisible by num_key_value_heads={self.num_key_value_heads}")

    @property
    def kv_channels(self) -> int:
        return int(self.head_dim)

    @property
    def num_query_groups(self) -> int:
        return self.num_key_value_heads

    @classmethod
    def from_dict(cls, data: dict, source: str | None = None) -> ModelConfig:
        return from_dict(cls, data, source=source)

    # --- HuggingFace config.json ---------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict, source: str | None = None) -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ConfigError("model_type", f"unsupported architecture {model_type!r}; supported: "
                              f"{list(ARCHITECTURES)}", source)

        def need(key):
            if key not in hf:
                raise ConfigError(key, "missing from HuggingFace config", source)
            return hf[key]

        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:  # transformers >= 5 keeps it under rope_parameters
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        rope_scaling = hf.get("rope_scaling") or (hf.get("rope_parameters") or {})
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if rope_type not in (None, "default"):
            raise ConfigError("rope_scaling", f"rope type {rope_type!r} is not supported yet", source)
        if model_type == "qwen2":
            qkv_bias = True
        else:
            # Llama's attention_bias covers q/k/v and o_proj: the embedded engine serves it, the
            # Megatron side refuses it (hf_tables), since linear_proj has no bias there.
            qkv_bias = bool(hf.get("attention_bias", False))
        if hf.get("mlp_bias"):
            raise ConfigError("mlp_bias", "MLP biases are not supported", source)
        data = dict(
            arch=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_attention_heads=need("num_attention_heads"),
            num_key_value_heads=hf.get("num_key_value_heads") or need("num_attention_heads"),
            head_dim=hf.get("head_dim"),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            qkv_bias=qkv_bias,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
        )
        return from_dict(cls, data, source=source)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelConfig:
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise ConfigError("config.json", "not found", str(path))
        try:
            hf = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError("config.json", f"invalid JSON: {e}", str(cfg_path)) from None
        return cls.from_hf_dict(hf, source=str(cfg_path))

    def to_hf_dict(self) -> dict:
        hf = {
            "architectures": [_HF_ARCH_CLASS[self.arch]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.arch == "llama":
            hf["attention_bias"] = bool(self.qkv_bias)
            hf["mlp_bias"] = False
        elif not self.qkv_bias:
            raise ConfigError("qkv_bias", "Qwen2 checkpoints always carry QKV biases")
        return hf

    def to_dict(self) -> dict:
        return to_dict(self)

    def num_parameters(self) -> int:
        h, f, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        q = self.num_attention_heads * self.kv_channels
        kv = 2 * self.num_key_value_heads * self.kv_channels
        attn = h * (q + kv) + q * h + ((q + kv) if self.qkv_bias else 0)
        if self.qkv_bias and self.arch == "llama":
            attn += h  # HF Llama's attention_bias also biases o_proj
        mlp = 3 * h * f
        per_layer = attn + mlp + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + emb + h
