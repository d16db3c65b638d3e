"""The run configuration `erpo-mega train CONFIG` reads: one typed tree, validated at start-up.

Each section belongs to one room (model, data, rollout, algorithm, Megatron training, SFT,
evaluation, checkpoints); the rooms own their dataclasses and this module only composes
them, so a key's documentation lives next to the code that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from erpo_mega.algo.config import ERPOConfig, LossConfig
from erpo_mega.bench.config import BenchSection
from erpo_mega.config import ConfigError, bounds, choices, load_config, validate
from erpo_mega.data.datasets import DataConfig
from erpo_mega.megatron.config import OptimConfig, ParallelConfig
from erpo_mega.models.config import ModelConfig
from erpo_mega.orchestration.eval_config import EvalSetConfig, check_set_names


@dataclass
class ModelSection:
    """Where the policy comes from: an HF or erpo-mega Megatron dir, or a fresh `arch`."""

    init_from: str | None = None  # HF dir (each rank streams its shards) or a Megatron/erpo-mega checkpoint dir
    arch: ModelConfig | None = None  # architecture of a model trained from scratch (vocab from the tokenizer)
    tokenizer: str = "builtin"  # "builtin": the local character tokenizer; else an HF tokenizer dir
    bf16: bool | None = None  # None: bf16 on GPU, fp32 on CPU

    def __post_init__(self) -> None:
        if self.init_from is None and self.arch is None:
            raise ConfigError("init_from", "set model.init_from (a checkpoint dir) or model.arch (a fresh model)")


@dataclass
class RolloutSection:
    """Sampling and the engines that do it."""

    engine: str = field(default="embedded", metadata=choices("embedded", "sglang", "external"))
    engine_urls: list[str] = field(default_factory=list)  # external: every engine (weight sync goes to each)
    router_url: str | None = None  # external: where /generate goes (sglang-router); default: engine_urls[0]
    num_engines: int = field(default=1, metadata=bounds(ge=1))  # embedded/sglang engines the trainer starts
    engine_tp: int = field(default=1, metadata=bounds(ge=1))
    # engines share the trainer's GPUs: release their memory while training, offload the
    # trainer's params/grads/optimizer while generating (orchestration/colocate.py)
    colocate: bool = False
    host: str = "127.0.0.1"
    base_port: int = field(default=0, metadata=bounds(ge=0, le=65535))  # 0: pick free ports
    prompts_per_step: int = field(default=16, metadata=bounds(ge=1))
    samples_per_prompt: int = field(default=8, metadata=bounds(ge=2))
    max_new_tokens: int = field(default=64, metadata=bounds(ge=1))
    temperature: float = field(default=1.0, metadata=bounds(gt=0))
    top_p: float = field(default=1.0, metadata=bounds(gt=0, le=1))  # 1 during RL (see __post_init__)
    top_k: int = -1  # -1 during RL
    sync_method: str = field(default="tensor", metadata=choices("tensor", "disk", "distributed"))
    bucket_mb: float = field(default=512.0, metadata=bounds(gt=0))
    request_timeout_s: float = field(default=300.0, metadata=bounds(gt=0))
    max_concurrency: int = field(default=8, metadata=bounds(ge=1))
    verify_sync: bool = False  # compare engine weights with the trainer's after each sync (slow)
    drop_truncated: bool = False  # exclude responses cut by max_new_tokens from the loss
    # stop at a run's first RL step when the engine's log-probs differ from the trainer's by more
    # than this (mean nats/token): the engine scores another distribution (e.g. untempered); null: off
    max_logp_gap: float | None = field(default=0.1, metadata=bounds(gt=0))

    def __post_init__(self) -> None:
        if self.top_p < 1.0 or self.top_k != -1:
            key = "top_p" if self.top_p < 1.0 else "top_k"
            raise ConfigError(key, f"{getattr(self, key)} truncates the sampling distribution, but the trainer's "
                              "log-probs, ratios, TIS weights and ERPO's entropies come from the full one, so "
                              "every one of them would be off; RL rollouts need top_p=1 and top_k=-1")


@dataclass
class AlgoSection:
    advantage: str = "erpo"  # registry name: erpo | grpo | dr_grpo | "pkg.module:function"
    policy_loss: str = "ppo_clip"
    erpo: ERPOConfig = field(default_factory=ERPOConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    updates_per_step: int = field(default=1, metadata=bounds(ge=1))  # optimizer steps per rollout (mini-batches)


@dataclass
class TrainSection:
    steps: int = field(default=100, metadata=bounds(ge=0))
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


@dataclass
class SFTSection:
    """Supervised warm start on the built-in task's noisy solution chains (0 steps: skip)."""

    steps: int = field(default=0, metadata=bounds(ge=0))
    batch_size: int = field(default=64, metadata=bounds(ge=1))
    noise: float = field(default=0.1, metadata=bounds(ge=0, le=1))
    redundancy: float = field(default=0.3, metadata=bounds(ge=0, le=1))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=10, total_steps=1000))


@dataclass
class EvalSection:
    """Held-out evaluation. With `sets` empty: one greedy sample per prompt of `split` (the fields
    below); with `sets`: each named benchmark on its own (see orchestration/eval_config.py)."""

    every: int = field(default=10, metadata=bounds(ge=0))  # 0: only at the end
    split: str = field(default="test", metadata=choices("train", "validation", "test"))
    num_prompts: int = field(default=200, metadata=bounds(ge=1))
    temperature: float = field(default=0.0, metadata=bounds(ge=0))  # 0: greedy
    max_new_tokens: int | None = field(default=None, metadata=bounds(ge=1))  # None: rollout.max_new_tokens
    sets: dict[str, EvalSetConfig] = field(default_factory=dict)  # name -> benchmark (avg@k, pass@k)
    entropy: bool = True  # policy entropy and CDP fraction of the eval responses (one forward pass)
    save_samples: bool = False  # every eval response to RUN_DIR/eval_samples/step_N.jsonl

    def __post_init__(self) -> None:
        check_set_names(self.sets)


@dataclass
class CheckpointSection:
    every: int = field(default=0, metadata=bounds(ge=0))  # 0: only at the end
    keep_last: int = field(default=2, metadata=bounds(ge=1))
    # --resume with a damaged latest checkpoint: load the newest complete earlier one (default: stop)
    resume_fallback: bool = False


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    seed: int = 1
    model: ModelSection = field(default_factory=lambda: ModelSection(arch=ModelConfig()))
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algo: AlgoSection = field(default_factory=AlgoSection)
    train: TrainSection = field(default_factory=TrainSection)
    sft: SFTSection = field(default_factory=SFTSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    bench: BenchSection = field(default_factory=BenchSection)  # `erpo-mega bench` only
    reward: str = "auto"  # auto (builtin task checker, else math_verify) | builtin | math_verify | "pkg.mod:fn"
    tensorboard: bool = True
    progress: bool = True  # rich progress display (off in non-interactive logs if you prefer)

    def __post_init__(self) -> None:
        validate(self)
        if self.rollout.engine == "external" and not self.rollout.engine_urls:
            raise ConfigError("rollout.engine_urls", "engine=external needs at least one engine URL")
        n = self.rollout.prompts_per_step * self.rollout.samples_per_prompt
        if self.algo.updates_per_step > n:
            raise ConfigError("algo.updates_per_step", f"{self.algo.updates_per_step} mini-batches need at least "
                              f"as many samples per step, but rollout.prompts_per_step x samples_per_prompt = {n}")


def load_run_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    return load_config(RunConfig, path, overrides)
