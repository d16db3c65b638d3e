"""Build megatron-core's `GPTModel` for a Qwen2/Llama `ModelConfig` at any TP/PP.

The layer spec is data: TransformerEngine's spec when TE is importable (GPU clusters),
megatron's local spec otherwise (CPU, laptops, CI). The model does not know how it was
launched; parallel sizes come from `parallel_state`, initialised by the caller.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from erpo_mega.models.config import ModelConfig


@dataclass(frozen=True)
class BuildOptions:
    """How to instantiate (not what architecture): dtype, init, spec choice."""

    params_dtype: torch.dtype = torch.float32
    bf16: bool = False
    init_method_std: float = 0.02
    layer_spec: str = "auto"  # auto | local | te
    seed: int = 1234
    recompute: str | bool = "none"  # none | selective (core attention) | full (whole layers); True = full
    recompute_num_layers: int = 1
    sequence_parallel: bool = False


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def padded_vocab_size(vocab_size: int, tp_size: int = 1, multiple: int = 128) -> int:
    """Vocabulary rows the Megatron embedding/output layer hold (all TP ranks together).

    Megatron shards the vocabulary evenly over TP. Padding to a TP-independent multiple (128
    divides evenly by every power-of-two TP up to 128) keeps the global embedding shape the
    same at every TP, so checkpoints reshard between layouts without touching the vocabulary.
    """
    padded = ((vocab_size + multiple - 1) // multiple) * multiple
    if padded % tp_size:
        raise ValueError(f"padded vocabulary {padded} is not divisible by tensor-parallel size {tp_size}")
    return padded


def make_transformer_config(cfg: ModelConfig, opts: BuildOptions | None = None):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    opts = opts or BuildOptions()
    on_gpu = torch.cuda.is_available()
    rc = {True: "full", False: "none"}.get(opts.recompute, opts.recompute)
    if rc not in ("none", "selective", "full"):
        raise ValueError(f"recompute must be none|selective|full, got {opts.recompute!r}")
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(cfg.qkv_bias),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=opts.init_method_std,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        sequence_parallel=opts.sequence_parallel,
        params_dtype=opts.params_dtype,
        bf16=opts.bf16,
        pipeline_dtype=opts.params_dtype,
        # Packed micro-batches have their own lengths; with PP the schedule then sends each
        # activation's shape ahead of it instead of assuming one fixed [S, 1, H] for all.
        variable_seq_lengths=ps.get_pipeline_model_parallel_world_size() > 1,
        # (megatron rejects variable_seq_lengths with the default MoE dispatcher even for a
        # dense model; the dispatcher is unused here, so name the one it accepts)
        moe_token_dispatcher_type="alltoall",
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # Fusions need CUDA kernels; the unfused paths are the same math.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        recompute_granularity=None if rc == "none" else rc,
        recompute_method="uniform" if rc == "full" else None,
        recompute_num_layers=opts.recompute_num_layers if rc == "full" else None,
    )


def layer_spec_for_name(opts: BuildOptions) -> str:
    """"te" or "local": what `layer_spec_for` builds for these options."""
    choice = opts.layer_spec
    if choice == "auto":
        choice = "te" if have_transformer_engine() and torch.cuda.is_available() else "local"
    return choice


def layer_spec_for(opts: BuildOptions):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    choice = layer_spec_for_name(opts)
    if choice == "te":
        return specs.get_gpt_layer_with_transformer_engine_spec()
    if choice == "local":
        from erpo_mega.models.chunked_attention import ChunkedDotProductAttention

        spec = specs.get_gpt_layer_local_spec(normalization="RMSNorm")
        # same math, query-chunked: long packed rows no longer need S x S scores per head
        spec.submodules.self_attention.submodules.core_attention = ChunkedDotProductAttention
        return spec
    raise ValueError(f"layer_spec must be auto|local|te, got {choice!r}")


def build_gpt_model(cfg: ModelConfig, opts: BuildOptions | None = None, vp_stage: int | None = None):
    """One pipeline stage of the policy as a megatron `GPTModel` (this rank's TP shard)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    opts = opts or BuildOptions()
    tcfg = make_transformer_config(cfg, opts)
    pre = ps.is_pipeline_first_stage(ignore_virtual=True)
    post = ps.is_pipeline_last_stage(ignore_virtual=True)
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=layer_spec_for(opts),
        vocab_size=padded_vocab_size(cfg.vocab_size, ps.get_tensor_model_parallel_world_size()),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta,
    )
    if opts.bf16:
        model = model.to(torch.bfloat16)
    return model


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's wrappers (DDP, Float16Module), which nest as `.module`."""
    while hasattr(module, "module"):
        module = module.module
    return module
