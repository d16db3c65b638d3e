"""Turn a routine (sharded-optimizer) training checkpoint into one that loads at any TP/PP.

Routine saves write megatron's distributed-optimizer state in the "sharded" format: each
rank writes its own DP shard, nothing is gathered, so a 7B TP2 save does not put ~45 GB of
gathered optimizer state on every rank. That format reloads at any DP size but only at the
saved TP/PP. To change TP/PP, run this once at the saved TP/PP (any DP), e.g.

    torchrun --nproc-per-node=4 -m erpo_mega.megatron.reshard RUN/checkpoints OUT

It loads the checkpoint (model, optimizer, scheduler, step, extra) and saves it under OUT
in the "reshardable" (per-parameter, model-space) format, which `load_checkpoint` reads at
any TP/PP/DP. Collective: every rank of the job runs it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from erpo_mega.megatron import checkpoint as ckpt


def reshard_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Load `src` (a checkpoint root or iter dir) at its saved TP/PP and re-save it under `dst`
    in the reshardable format; returns the new iter directory. Initialises process groups at
    the saved layout if the caller has not (world size must be a multiple of tp * pp)."""
    import torch
    from megatron.core import parallel_state as ps

    from erpo_mega.megatron.config import OptimConfig, ParallelConfig
    from erpo_mega.megatron.worker import PolicyWorker
    from erpo_mega.models.convert import read_model_config
    from erpo_mega.parallel.dist import init_distributed

    ckpt_dir = ckpt.resolve_checkpoint(src)
    ckpt.verify_checkpoint_files(ckpt_dir)
    state = ckpt.read_train_state(ckpt_dir)
    tp, pp = int(state["layout"]["tp"]), int(state["layout"]["pp"])
    if not (ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() == tp
            and ps.get_pipeline_model_parallel_world_size() == pp):
        init_distributed(tp, pp)
    model_cfg = read_model_config(ckpt_dir)
    bf16 = bool(state.get("bf16", torch.cuda.is_available()))
    # The optimizer's hyper-parameters and the LR schedule come from the checkpoint.
    worker = PolicyWorker().setup(model_cfg, ParallelConfig(tp=tp, pp=pp), OptimConfig(), bf16=bf16,
                                  init_distributed_groups=False)
    extra = worker.load(ckpt_dir)
    return worker.save(dst, extra=extra, optim_format="reshardable")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m erpo_mega.megatron.reshard", description=(
        "Re-save a sharded-optimizer training checkpoint in the reshardable format (loads at any "
        "TP/PP/DP). Run it with torchrun/srun at the checkpoint's saved TP x PP (any DP)."))
    p.add_argument("src", help="checkpoint root (with 'latest') or iter_N directory")
    p.add_argument("dst", help="output checkpoint root")
    a = p.parse_args(argv)
    try:
        out = reshard_checkpoint(a.src, a.dst)
    except ckpt.CheckpointError as e:
        print(f"reshard: error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
