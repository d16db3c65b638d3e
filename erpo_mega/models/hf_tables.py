"""HuggingFace <-> megatron-core weight tables for Qwen2 and Llama decoders.

One declarative table per architecture says, for every megatron `GPTModel` parameter:
which HF tensors it is made of, how they are laid out (copy, fused QKV, fused gate/up,
padded vocabulary), how tensor parallelism splits it, and under which key megatron's
dist-checkpointing stores it. Offline conversion (`convert.py`) and live weight export to
inference engines (`weights/export.py`) both read the same table, so the two cannot drift.

Everything here is pure tensor code on *global* (TP=1) tensors plus helpers that merge TP
shards; no process groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erpo_mega.config import ConfigError
from erpo_mega.models.builder import padded_vocab_size
from erpo_mega.models.config import ModelConfig

# --- layouts: how several HF tensors become one megatron tensor ------------------------------
COPY = "copy"  # same tensor
QKV = "qkv"  # [q; k; v] -> per query group [q heads of the group, k head, v head]
GATE_UP = "gate_up"  # [gate; up] stacked on dim 0
VOCAB = "vocab"  # rows padded with zeros to padded_vocab_size(V)

# --- tensor-parallel split of the megatron parameter ------------------------------------------
REPLICATED = "replicated"  # norms: every TP rank holds the whole tensor
COLUMN = "column"  # ColumnParallelLinear / vocab-parallel embedding: contiguous chunks of dim 0
ROW = "row"  # RowParallelLinear: contiguous chunks of dim 1
COLUMN_GATED = "column_gated"  # fused gate/up: each rank holds [gate chunk; up chunk]

# --- when a rule applies ------------------------------------------------------------------------
ALWAYS = "always"
IF_QKV_BIAS = "qkv_bias"
IF_UNTIED = "untied"


@dataclass(frozen=True)
class WeightRule:
    """One megatron parameter and the HF tensors it is built from.

    Names may contain `{i}`, the global layer index. `ckpt_key` is the ShardedTensor key
    megatron's `sharded_state_dict()` uses: per-layer tensors are stacked on a leading axis of
    size num_layers under one key without the index (and the local spec's norms are stored
    under the TransformerEngine names, so checkpoints load into either spec).
    """

    mcore: str
    hf: tuple[str, ...]
    layout: str
    tp_split: str
    ckpt_key: str
    aliases: tuple[str, ...] = ()  # module-parameter names of the same tensor in the TE spec
    when: str = ALWAYS

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.mcore


_L = "decoder.layers.{i}."
_H = "model.layers.{i}."

# Qwen2ForCausalLM tensor names (transformers). Qwen2 always carries q/k/v biases.
QWEN2_TABLE: tuple[WeightRule, ...] = (
    WeightRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB, COLUMN,
               "embedding.word_embeddings.weight"),
    WeightRule(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), COPY, REPLICATED,
               "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
               aliases=(_L + "self_attention.linear_qkv.layer_norm_weight",)),
    WeightRule(_L + "self_attention.linear_qkv.weight",
               (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
               QKV, COLUMN, "decoder.layers.self_attention.linear_qkv.weight"),
    WeightRule(_L + "self_attention.linear_qkv.bias",
               (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
               QKV, COLUMN, "decoder.layers.self_attention.linear_qkv.bias", when=IF_QKV_BIAS),
    WeightRule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), COPY, ROW,
               "decoder.layers.self_attention.linear_proj.weight"),
    WeightRule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), COPY, REPLICATED,
               "decoder.layers.mlp.linear_fc1.layer_norm_weight",
               aliases=(_L + "mlp.linear_fc1.layer_norm_weight",)),
    WeightRule(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
               GATE_UP, COLUMN_GATED, "decoder.layers.mlp.linear_fc1.weight"),
    WeightRule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), COPY, ROW,
               "decoder.layers.mlp.linear_fc2.weight"),
    WeightRule("decoder.final_layernorm.weight", ("model.norm.weight",), COPY, REPLICATED,
               "decoder.final_layernorm.weight"),
    WeightRule("output_layer.weight", ("lm_head.weight",), VOCAB, COLUMN, "output_layer.weight", when=IF_UNTIED),
)

# LlamaForCausalLM uses exactly Qwen2's tensor names; what differs (no QKV bias, often tied
# embeddings, rope theta) comes from the config, so the table is shared deliberately.
LLAMA_TABLE: tuple[WeightRule, ...] = QWEN2_TABLE

TABLES: dict[str, tuple[WeightRule, ...]] = {"qwen2": QWEN2_TABLE, "llama": LLAMA_TABLE}

# Per-module `_extra_state` objects megatron's sharded_state_dict() lists for each layer (the
# local spec stores None in them); a checkpoint carries them so a plain
# `dist_checkpointing.load(model.sharded_state_dict())` finds every key it asks for.
LAYER_EXTRA_STATE_KEYS: tuple[str, ...] = (
    "decoder.layers.self_attention.linear_qkv._extra_state",
    "decoder.layers.self_attention.linear_proj._extra_state",
    "decoder.layers.mlp.linear_fc1._extra_state",
    "decoder.layers.mlp.linear_fc2._extra_state",
)


@dataclass(frozen=True)
class BoundWeight:
    """A rule instantiated for one layer (or for no layer): concrete names and shapes."""

    rule: WeightRule
    layer: int | None
    mcore: str
    hf: tuple[str, ...]
    mcore_shape: tuple[int, ...]  # global (TP=1) shape, vocabulary padded
    hf_shapes: tuple[tuple[int, ...], ...]

    @property
    def ckpt_key(self) -> str:
        return self.rule.ckpt_key


def check_supported(cfg: ModelConfig) -> None:
    if cfg.arch not in TABLES:
        raise ConfigError("arch", f"no weight table for architecture {cfg.arch!r}; have {sorted(TABLES)}")
    if cfg.arch == "llama" and cfg.qkv_bias:
        # HF's attention_bias also adds an o_proj bias, which megatron's linear_proj lacks here.
        raise ConfigError("qkv_bias", "Llama with attention_bias=True (o_proj bias) is not supported")


def _applies(rule: WeightRule, cfg: ModelConfig) -> bool:
    if rule.when == IF_QKV_BIAS:
        return bool(cfg.qkv_bias)
    if rule.when == IF_UNTIED:
        return not cfg.tie_word_embeddings
    return True


def _shapes(rule: WeightRule, cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.kv_channels
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    if rule.layout == VOCAB:
        return (padded_vocab_size(cfg.vocab_size), h), ((cfg.vocab_size, h),)
    if rule.layout == QKV:
        if rule.mcore.endswith(".bias"):
            return (q + 2 * kv,), ((q,), (kv,), (kv,))
        return (q + 2 * kv, h), ((q, h), (kv, h), (kv, h))
    if rule.layout == GATE_UP:
        return (2 * f, h), ((f, h), (f, h))
    name = rule.mcore
    if name.endswith("layernorm.weight"):
        shape = (h,)
    elif name.endswith("linear_proj.weight"):
        shape = (h, q)
    elif name.endswith("linear_fc2.weight"):
        shape = (h, f)
    else:  # pragma: no cover - a new COPY rule must say its shape here
        raise KeyError(f"no shape rule for {name}")
    return shape, (shape,)


def bound_weights(cfg: ModelConfig) -> list[BoundWeight]:
    """Every megatron parameter of the model, in forward order, with names and shapes bound."""
    check_supported(cfg)
    out: list[BoundWeight] = []
    table = TABLES[cfg.arch]
    layer_rules = [r for r in table if r.per_layer and _applies(r, cfg)]

    def bind(rule: WeightRule, layer: int | None) -> BoundWeight:
        fmt = {} if layer is None else {"i": layer}
        mshape, hshapes = _shapes(rule, cfg)
        return BoundWeight(rule, layer, rule.mcore.format(**fmt), tuple(n.format(**fmt) for n in rule.hf),
                           mshape, hshapes)

    head = [r for r in table if not r.per_layer and _applies(r, cfg)]
    out.append(bind(head[0], None))  # the embedding comes first
    for i in range(cfg.num_layers):
        out.extend(bind(r, i) for r in layer_rules)
    out.extend(bind(r, None) for r in head[1:])
    return out


def canonical_mcore_name(name: str) -> str:
    """Map a module-parameter name of either layer spec (local or TE) to the table's name."""
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "decoder" and parts[1] == "layers" and parts[2].isdigit():
        templ = ".".join(["decoder", "layers", "{i}", *parts[3:]])
        for rule in QWEN2_TABLE:
            if templ in rule.aliases:
                return rule.mcore.format(i=parts[2])
    return name


# --- layout transforms on global tensors -------------------------------------------------------
def _group(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t.reshape(groups, -1, *t.shape[1:])


def hf_to_mcore(bw: BoundWeight, tensors: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Build the global megatron tensor from its HF tensors (in `bw.hf` order)."""
    layout = bw.rule.layout
    if layout == COPY:
        return tensors[0].contiguous()
    if layout == VOCAB:
        (t,) = tensors
        out = t.new_zeros(bw.mcore_shape)
        out[: t.shape[0]] = t
        return out
    if layout == GATE_UP:
        return torch.cat(tensors, dim=0)
    if layout == QKV:
        g = cfg.num_query_groups
        q, k, v = (_group(t, g) for t in tensors)
        return torch.cat([q, k, v], dim=1).reshape(bw.mcore_shape)
    raise ValueError(f"unknown layout {layout!r}")


def mcore_to_hf(bw: BoundWeight, tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Split a global megatron tensor into its HF tensors (fresh, contiguous)."""
    layout = bw.rule.layout
    if layout == COPY:
        return [tensor.clone()]
    if layout == VOCAB:
        return [tensor[: cfg.vocab_size].clone()]
    if layout == GATE_UP:
        gate, up = tensor.chunk(2, dim=0)
        return [gate.clone(), up.clone()]
    if layout == QKV:
        d = cfg.kv_channels
        per_group_q = cfg.num_attention_heads // cfg.num_query_groups * d
        grouped = _group(tensor, cfg.num_query_groups)
        q, k, v = grouped.split([per_group_q, d, d], dim=1)
        return [x.reshape(s).clone() for x, s in zip((q, k, v), bw.hf_shapes)]
    raise ValueError(f"unknown layout {layout!r}")


# --- tensor parallelism --------------------------------------------------------------------------
def tp_shard(bw: BoundWeight, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's slice of a global megatron tensor (what the module holds)."""
    split = bw.rule.tp_split
    if split == REPLICATED or size == 1:
        return full
    if split == COLUMN:
        return full.chunk(size, dim=0)[rank]
    if split == ROW:
        return full.chunk(size, dim=1)[rank]
    if split == COLUMN_GATED:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    raise ValueError(f"unknown tp split {split!r}")


def tp_merge(bw: BoundWeight, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `tp_shard` over all ranks' slices (in TP rank order)."""
    split = bw.rule.tp_split
    if split == REPLICATED or len(shards) == 1:
        return shards[0]
    if split == COLUMN:
        return torch.cat(shards, dim=0)
    if split == ROW:
        return torch.cat(shards, dim=1)
    if split == COLUMN_GATED:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(f"unknown tp split {split!r}")


def validate_parallel_layout(cfg: ModelConfig, tp: int, pp: int) -> None:
    """Raise ConfigError when the model cannot be split over `tp` x `pp` as megatron requires."""
    if tp < 1 or pp < 1:
        raise ConfigError("tp" if tp < 1 else "pp", "must be >= 1")
    g = cfg.num_query_groups
    checks = [
        ("num_attention_heads", cfg.num_attention_heads % tp == 0, f"{cfg.num_attention_heads} % tp={tp} != 0"),
        ("num_key_value_heads", g % tp == 0 or tp % g == 0, f"{g} is neither a multiple nor a divisor of tp={tp}"),
        ("intermediate_size", cfg.intermediate_size % tp == 0, f"{cfg.intermediate_size} % tp={tp} != 0"),
        ("vocab_size", padded_vocab_size(cfg.vocab_size) % tp == 0,
         f"padded vocabulary {padded_vocab_size(cfg.vocab_size)} % tp={tp} != 0"),
        ("num_layers", cfg.num_layers % pp == 0, f"{cfg.num_layers} % pp={pp} != 0 (uneven stages unsupported)"),
    ]
    for key, ok, msg in checks:
        if not ok:
            raise ConfigError(key, msg)
