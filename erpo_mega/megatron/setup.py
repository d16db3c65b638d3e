"""Build the trainable policy on this rank: GPTModel stage -> DDP -> optimizer -> LR schedule.

Precision follows the machine: bf16 parameters with fp32 main weights/grads on GPU, plain
fp32 on CPU (where bf16 matmuls are slow and the tests compare across layouts at fp32
tolerance). megatron's distributed optimizer (state sharded over DP) is used at every DP
size, DP = 1 included: its checkpoint format differs from the plain optimizer's (it keeps
fp32 main parameters), and one format is what lets a checkpoint saved at DP = 1 resume at
DP = 4 and back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erpo_mega.megatron.config import OptimConfig, ParallelConfig
from erpo_mega.megatron.train_step import configure_for_global_loss
from erpo_mega.models.builder import BuildOptions, build_gpt_model, layer_spec_for_name
from erpo_mega.models.config import ModelConfig


@dataclass
class PolicyModules:
    model_chunks: list  # DDP-wrapped GPTModel stages (one per rank: no virtual pipeline)
    optimizer: object  # megatron MegatronOptimizer / ChainedOptimizer
    scheduler: object  # megatron OptimizerParamScheduler
    bf16: bool

    def unwrapped(self) -> list:
        """The GPTModel stages inside DDP (what sharded_state_dict is taken from)."""
        return [getattr(c, "module", c) for c in self.model_chunks]


def build_policy(model_cfg: ModelConfig, parallel: ParallelConfig, optim: OptimConfig,
                 bf16: bool | None = None, load_weights=None) -> PolicyModules:
    """Model, DDP, optimizer and scheduler; megatron parallel state must be initialised.

    `load_weights(model_chunks)` fills the initial weights *before* the optimizer exists:
    with bf16 the (distributed) optimizer copies the bf16 parameters into its fp32 main
    parameters when it is built, and the first step writes the main parameters back, so
    weights loaded after that point would be replaced by the random init.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if ps.get_tensor_model_parallel_world_size() != parallel.tp or \
            ps.get_pipeline_model_parallel_world_size() != parallel.pp:
        raise ValueError(f"parallel: config asks for tp={parallel.tp} pp={parallel.pp} but megatron is "
                         f"initialised with tp={ps.get_tensor_model_parallel_world_size()} "
                         f"pp={ps.get_pipeline_model_parallel_world_size()}")
    bf16 = torch.cuda.is_available() if bf16 is None else bf16
    dtype = torch.bfloat16 if bf16 else torch.float32
    opts = BuildOptions(params_dtype=dtype, bf16=bf16, seed=parallel.seed, recompute=parallel.recompute,
                        recompute_num_layers=parallel.recompute_num_layers,
                        sequence_parallel=parallel.sequence_parallel)
    if parallel.sequence_parallel and layer_spec_for_name(opts) != "te":
        from erpo_mega.config import ConfigError

        raise ConfigError("sequence_parallel", "needs the TransformerEngine layer spec (a CUDA GPU with "
                          "transformer_engine installed); the local spec here runs without it")
    model = build_gpt_model(model_cfg, opts)
    model.config.calculate_per_token_loss = True  # before DDP: DDP then sums grads over DP
    use_dist_opt = True  # at every DP size: one optimizer checkpoint format (see module docstring)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather, use_distributed_optimizer=use_dist_opt,
        average_in_collective=False)
    chunks = [DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)]
    if load_weights is not None:
        load_weights(chunks)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=bf16, params_dtype=dtype, use_distributed_optimizer=use_dist_opt)
    optimizer = get_megatron_optimizer(opt_config, chunks)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr, lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=optim.total_steps, lr_decay_style=optim.lr_schedule, start_wd=optim.weight_decay,
        end_wd=optim.weight_decay, wd_incr_steps=optim.total_steps, wd_incr_style="constant")
    configure_for_global_loss(model.config, chunks, optimizer)
    return PolicyModules(chunks, optimizer, scheduler, bf16)
