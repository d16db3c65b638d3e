"""Live export: this rank's megatron TP/PP shards -> full HF-named tensors for inference engines.

The pipeline per parameter is gather (TP all-gather on the owning stage) -> transfer (PP,
from the owning stage) -> rename/relayout (the same `hf_tables` conversion uses). Parameters
are processed one at a time in forward order, so peak extra memory is one full parameter
(e.g. one layer's fused fc1), never the model.

Who yields:
- `yield_on="rank0"` (default): the rank at dp=0, tp=0, pp=0 (global rank 0 under
  megatron's rank ordering) yields every tensor. Other ranks of the dp=0 model-parallel
  replica take part in the collectives and yield nothing; ranks of other DP replicas return
  at once (their weights are identical copies).
- `yield_on="all"`: every rank yields every tensor (TP all-gather + PP broadcast inside each
  replica), for engines colocated with each training rank.
- `yield_on="stage"`: the tp=0 rank of each pipeline stage (dp=0) yields the tensors its own
  stage owns, with no PP transfer at all: each stage then sends its layers to the engines
  over its own weight-update group (`erpo_mega.orchestration.engines.StagedWeightSync`),
  instead of funnelling the whole model through global rank 0.

Every rank must iterate the generator to the end: it is a sequence of collectives.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from erpo_mega.models import hf_tables as T
from erpo_mega.models.builder import unwrap_model
from erpo_mega.models.config import ModelConfig

YIELD_ON = ("rank0", "all", "stage")


def local_parameters(model_chunks: Iterable[torch.nn.Module], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """This rank's parameters keyed by the table's names with *global* layer numbers."""
    known = {bw.mcore for bw in T.bound_weights(cfg)}
    out: dict[str, torch.Tensor] = {}
    for chunk in model_chunks:
        chunk = unwrap_model(chunk)
        layers = chunk.decoder.layers
        for name, param in chunk.named_parameters():
            parts = name.split(".")
            if parts[:2] == ["decoder", "layers"]:
                parts[2] = str(layers[int(parts[2])].layer_number - 1)  # local index -> global layer
            canonical = T.canonical_mcore_name(".".join(parts))
            if canonical == "output_layer.weight" and cfg.tie_word_embeddings:
                continue  # the last stage's copy of the tied embedding
            if canonical not in known:
                raise KeyError(f"parameter {name!r} (as {canonical!r}) has no entry in the {cfg.arch} weight table")
            out[canonical] = param.detach()
    return out


def _owners(local: dict[str, torch.Tensor], pp_group, pp_size: int) -> dict[str, tuple[int, torch.dtype]]:
    """name -> (owning pipeline stage, dtype); the first stage holding a name owns it."""
    mine = {name: t.dtype for name, t in local.items()}
    everyone: list = [None] * pp_size
    if pp_size > 1:
        dist.all_gather_object(everyone, mine, group=pp_group)
    else:
        everyone = [mine]
    owners: dict[str, tuple[int, torch.dtype]] = {}
    for stage, names in enumerate(everyone):
        for name, dtype in names.items():
            owners.setdefault(name, (stage, dtype))
    return owners


def iter_hf_weights(model_chunks: torch.nn.Module | Iterable[torch.nn.Module], cfg: ModelConfig,
                    yield_on: str = "rank0") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, full_tensor)` for the whole model; see the module docstring for who yields."""
    from megatron.core import parallel_state as ps

    if yield_on not in YIELD_ON:
        raise ValueError(f"yield_on must be one of {YIELD_ON}, got {yield_on!r}")
    chunks = [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)
    if yield_on in ("rank0", "stage") and ps.get_data_parallel_rank() != 0:
        return
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    local = local_parameters(chunks, cfg)
    device = next(iter(local.values())).device
    owners = _owners(local, pp_group, pp)
    yields_here = yield_on == "all" or (tp_rank == 0 and (pp_rank == 0 or yield_on == "stage"))

    for bw in T.bound_weights(cfg):
        if bw.mcore not in owners:
            raise KeyError(f"no pipeline stage holds {bw.mcore!r}")
        owner, dtype = owners[bw.mcore]
        full = None
        with torch.no_grad():
            if pp_rank == owner:
                shard = local[bw.mcore].contiguous()
                if tp > 1 and bw.rule.tp_split != T.REPLICATED:
                    parts = [torch.empty_like(shard) for _ in range(tp)]
                    dist.all_gather(parts, shard, group=tp_group)
                    full = T.tp_merge(bw, parts)
                    del parts
                else:
                    full = shard
            if yield_on == "stage":
                if yields_here and pp_rank == owner:
                    yield from zip(bw.hf, T.mcore_to_hf(bw, full, cfg))
                del full
                continue
            if pp > 1:
                full = _pipeline_transfer(full, bw, owner, dtype, device, yield_on, tp_rank, pp_rank, pp_group)
            if yields_here:
                yield from zip(bw.hf, T.mcore_to_hf(bw, full, cfg))
        del full


def _pipeline_transfer(full, bw: T.BoundWeight, owner: int, dtype, device, yield_on: str, tp_rank: int,
                       pp_rank: int, pp_group):
    """Move the owner stage's full tensor to the stage(s) that yield it."""
    if yield_on == "all":
        if full is None:
            full = torch.empty(bw.mcore_shape, dtype=dtype, device=device)
        dist.broadcast(full, src=dist.get_global_rank(pp_group, owner), group=pp_group)
        return full
    if tp_rank != 0 or owner == 0:
        return full
    if pp_rank == owner:
        dist.send(full, dst=dist.get_global_rank(pp_group, 0))
    elif pp_rank == 0:
        full = torch.empty(bw.mcore_shape, dtype=dtype, device=device)
        dist.recv(full, src=dist.get_global_rank(pp_group, owner))
    return full
