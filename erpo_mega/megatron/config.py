"""Typed knobs of the Megatron policy worker: parallel layout and optimizer/LR schedule."""

from __future__ import annotations

from dataclasses import dataclass, field

from erpo_mega.config import ConfigError, bounds, choices, from_dict, validate

LR_SCHEDULES = ("constant", "linear", "cosine")
RECOMPUTE = ("none", "selective", "full")  # selective: core attention only; full: whole layers


@dataclass
class ParallelConfig:
    """How the policy is laid out; DP is whatever the world size leaves (world / (tp * pp))."""

    tp: int = field(default=1, metadata=bounds(ge=1))
    pp: int = field(default=1, metadata=bounds(ge=1))
    micro_batch_tokens: int = field(default=4096, metadata=bounds(ge=1))  # packed tokens per micro-batch
    pad_multiple: int = field(default=1, metadata=bounds(ge=1))  # round micro-batch lengths (8 on GPU helps)
    seed: int = 1234
    # How long the other ranks wait (on a CPU/gloo group) while rank 0 alone runs rollout,
    # rewards, eval or disk syncs; size it to the longest of those, not to a collective.
    rank0_wait_timeout_s: float = field(default=6 * 3600.0, metadata=bounds(gt=0))
    # Memory/throughput settings a 7B-70B run needs (megatron's own implementations):
    sequence_parallel: bool = False  # shard norms/dropout activations over TP (GPU + TransformerEngine)
    recompute: str = field(default="none", metadata=choices(*RECOMPUTE))  # activation recompute
    recompute_num_layers: int = field(default=1, metadata=bounds(ge=1))  # "full": layers per checkpointed chunk
    overlap_grad_reduce: bool = False  # DP grad reduce-scatter overlapped with backward
    overlap_param_gather: bool = False  # DP param all-gather overlapped with the next forward
    context_parallel: int = field(default=1, metadata=bounds(ge=1))  # planned, not built: must stay 1

    def __post_init__(self) -> None:
        validate(self)
        if self.context_parallel != 1:
            raise ConfigError("context_parallel", f"{self.context_parallel}: context parallelism is not built "
                              "yet (packed THD sequences would need per-rank cu_seqlens splits); use 1")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("sequence_parallel", "needs tp > 1 (it shards activations over the TP group)")
        if self.overlap_param_gather and not self.overlap_grad_reduce:
            raise ConfigError("overlap_param_gather", "needs overlap_grad_reduce: true (megatron overlaps both "
                              "through the same DDP buckets)")

    @classmethod
    def from_dict(cls, data: dict | None, source: str | None = None, prefix: str = "") -> ParallelConfig:
        return from_dict(cls, data, source=source, prefix=prefix)


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay, global-norm clipping and warm-up + decay."""

    lr: float = field(default=1e-6, metadata=bounds(gt=0))
    min_lr: float = field(default=0.0, metadata=bounds(ge=0))
    weight_decay: float = field(default=0.0, metadata=bounds(ge=0))
    adam_beta1: float = field(default=0.9, metadata=bounds(ge=0, lt=1))
    adam_beta2: float = field(default=0.999, metadata=bounds(ge=0, lt=1))
    adam_eps: float = field(default=1e-8, metadata=bounds(gt=0))
    clip_grad: float = field(default=1.0, metadata=bounds(ge=0))  # 0 disables clipping
    warmup_steps: int = field(default=0, metadata=bounds(ge=0))
    total_steps: int = field(default=1000, metadata=bounds(ge=1))  # decay horizon
    lr_schedule: str = field(default="constant", metadata=choices(*LR_SCHEDULES))

    def __post_init__(self) -> None:
        validate(self)
        if self.min_lr > self.lr:
            raise ConfigError("min_lr", f"{self.min_lr} is larger than lr={self.lr}")
        if self.warmup_steps >= self.total_steps:
            raise ConfigError("warmup_steps", f"{self.warmup_steps} must be below total_steps={self.total_steps}")

    @classmethod
    def from_dict(cls, data: dict | None, source: str | None = None, prefix: str = "") -> OptimConfig:
        return from_dict(cls, data, source=source, prefix=prefix)
