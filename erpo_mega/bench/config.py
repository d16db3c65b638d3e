"""The `bench:` section of a run config: synthetic, comparable workloads for `erpo-mega bench`.

Prompts are random token ids of a fixed length and every response is forced to the same
length (`ignore_eos`), so two runs differ only in the layout and the hardware, never in what
the policy happened to generate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from erpo_mega.config import ConfigError, bounds, choices, validate


@dataclass
class BenchSection:
    prompt_len: int = field(default=128, metadata=bounds(ge=1))  # tokens per synthetic prompt
    response_len: int = field(default=128, metadata=bounds(ge=1))  # forced tokens per response
    random_init: bool = True  # no checkpoint: model.init_from is read for its architecture only
    model: str | None = None  # a named shape from erpo_mega.bench.shapes (e.g. qwen2.5-7b); overrides model.arch
    placement: str = field(default="auto", metadata=choices("auto", "colocated", "disaggregated"))
    nodes: int | None = field(default=None, metadata=bounds(ge=1))  # None: $SLURM_JOB_NUM_NODES or 1
    engine_devices: int | None = field(default=None, metadata=bounds(ge=1))  # None: engines x engine_tp
    # component runs: "rollout" (generation only, no log-prob/update/sync), "train" (log-prob + update
    # on synthetic responses, no engines, no sync); None: the whole RL step
    only: str | None = field(default=None, metadata=choices(None, "rollout", "train"))

    def __post_init__(self) -> None:
        validate(self)
        if self.model is not None:
            from erpo_mega.bench.shapes import SHAPES

            if self.model.lower() not in SHAPES:
                raise ConfigError("model", f"unknown model shape {self.model!r}; known: {', '.join(SHAPES)}")
