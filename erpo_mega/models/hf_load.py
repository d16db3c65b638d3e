"""Load a HuggingFace safetensors directory straight into this rank's TP/PP shards.

Why: a multi-rank job that starts from an HF model must not depend on an offline,
single-process conversion (which refuses world size > 1 and writes a second full copy of
the model). Every rank streams only the tensors its pipeline stage holds, one at a time,
builds the global megatron tensor with the same `hf_tables` rules conversion and live
export use, and copies its own TP slice into the parameter. Peak extra memory is one
global megatron tensor (e.g. one layer's fused fc1, or the padded embedding).

Collective-free: each rank reads the files itself, so any TP x PP x DP layout works.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from erpo_mega.models import hf_tables as T
from erpo_mega.models.builder import unwrap_model
from erpo_mega.models.config import ModelConfig
from erpo_mega.models.hf_io import ConversionError, HFCheckpointReader, check_file_sizes

__all__ = ["is_hf_dir", "load_hf_into"]


def is_hf_dir(path: str | Path) -> bool:
    """An HF model directory: config.json plus safetensors weights (single file or index)."""
    path = Path(path)
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file())


def _tied_output_weight(chunk) -> torch.Tensor | None:
    """The last stage's own copy of a tied embedding (PP > 1 only; None otherwise)."""
    if not getattr(chunk, "post_process", False) or getattr(chunk, "pre_process", False):
        return None
    if not getattr(chunk, "share_embeddings_and_output_weights", False):
        return None
    out = getattr(chunk, "output_layer", None)
    return None if out is None else getattr(out, "weight", None)


def load_hf_into(model_chunks: torch.nn.Module | Iterable[torch.nn.Module], hf_dir: str | Path,
                 cfg: ModelConfig | None = None) -> ModelConfig:
    """Fill this rank's GPTModel chunk(s) from an HF Qwen2/Llama directory; returns its config.

    Checks the directory (shard sizes, every expected tensor with its shape, nothing
    unexplained) before touching the model, so a bad directory leaves the model as it was
    and the error names the file.
    """
    from megatron.core import parallel_state as ps

    from erpo_mega.models.convert import compare_model_configs, validate_hf_tensors
    from erpo_mega.weights.export import local_parameters

    hf_dir = Path(hf_dir)
    hf_cfg = ModelConfig.from_hf_dir(hf_dir)
    if cfg is not None:
        compare_model_configs(hf_cfg, cfg, "the model config")
    chunks = [unwrap_model(m) for m in ([model_chunks] if isinstance(model_chunks, torch.nn.Module)
                                        else model_chunks)]
    reader = HFCheckpointReader(hf_dir)
    try:
        check_file_sizes(reader.where.values())
        bws = T.bound_weights(hf_cfg)
        validate_hf_tensors(reader, hf_cfg, bws)
        local = local_parameters(chunks, hf_cfg)
        tied_out = [w for w in (_tied_output_weight(c) for c in chunks) if w is not None]
        tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        done = set()
        with torch.no_grad():
            for bw in bws:
                targets = [local[bw.mcore]] if bw.mcore in local else []
                if bw.mcore == "embedding.word_embeddings.weight":
                    targets += tied_out
                if not targets:
                    continue  # another pipeline stage holds it
                full = T.hf_to_mcore(bw, [reader.get(n) for n in bw.hf], hf_cfg)
                shard = T.tp_shard(bw, full, tp_rank, tp)
                for param in targets:
                    if tuple(param.shape) != tuple(shard.shape):
                        raise ConversionError(f"{reader.where[bw.hf[0]]}: {bw.mcore} shard has shape "
                                              f"{list(shard.shape)} but the model holds {list(param.shape)}")
                    param.copy_(shard.to(param.dtype))
                done.add(bw.mcore)
                del full, shard
        missing = sorted(set(local) - done)
        if missing:
            raise ConversionError(f"{hf_dir}: no HF tensors for parameter(s) {missing[:8]}")
    finally:
        reader.close()
    return hf_cfg
