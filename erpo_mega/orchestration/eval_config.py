"""Typed `eval` settings: named benchmark sets (`eval.sets`), kept free of heavy imports.

A set is sampled `samples` (k) times per problem and reported as avg@k and pass@k; set names
become metric-name prefixes (`aime24/pass@8`), so they are limited to one path segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from erpo_mega.config import ConfigError, bounds, choices, validate
from erpo_mega.data.datasets import STYLES

_SET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class EvalSetConfig:
    """One named benchmark: where its problems are and how to sample them."""

    # A JSONL or parquet file (e.g. from `erpo-mega prepare-data`); None: the built-in task's `split`.
    path: str | None = None
    split: str = field(default="test", metadata=choices("train", "validation", "test"))  # built-in task only
    style: str = field(default="auto", metadata=choices(*STYLES))  # file sets: field layout (see data.style)
    num_prompts: int | None = field(default=None, metadata=bounds(ge=1))  # first N problems (None: all)
    samples: int = field(default=1, metadata=bounds(ge=1))  # k responses per problem
    temperature: float = field(default=1.0, metadata=bounds(ge=0))  # 0: greedy (then samples must be 1)
    top_p: float = field(default=1.0, metadata=bounds(gt=0, le=1))
    top_k: int = -1
    max_new_tokens: int | None = field(default=None, metadata=bounds(ge=1))  # None: rollout.max_new_tokens
    pass_k: list[int] | None = None  # k values for pass@k (default 1, 2, 4, ... and `samples`)

    def __post_init__(self) -> None:
        validate(self)
        if self.temperature == 0 and self.samples > 1:
            raise ConfigError("samples", f"greedy decoding (temperature 0) gives {self.samples} identical "
                                         "samples; use samples: 1 or a temperature > 0")
        if self.path is not None and not self.path.endswith((".jsonl", ".parquet")):
            raise ConfigError("path", f"must be a .jsonl or .parquet file (as `erpo-mega prepare-data` writes), "
                                      f"got {self.path!r}")
        if self.style == "custom":
            raise ConfigError("style", "'custom' is not available for eval sets; write the file with "
                                       "`erpo-mega prepare-data` or use math/gsm8k/dapo")
        bad = [k for k in self.pass_k or [] if not 1 <= k <= self.samples]
        if bad:
            raise ConfigError("pass_k", f"every k must be in [1, samples={self.samples}], got {bad}")


def check_set_names(sets: dict[str, EvalSetConfig]) -> None:
    """Set names become metric-name prefixes (`aime24/pass@8`): keep them to one path segment."""
    for name in sets:
        if not _SET_NAME.match(str(name)) or name == "time":
            raise ConfigError(f"sets.{name}", "set names must be letters, digits, '_', '.' or '-' (and not 'time')")


def legacy_set_config(split: str, num_prompts: int, temperature: float,
                      max_new_tokens: int | None) -> EvalSetConfig:
    """The old `eval.split` evaluation expressed as a set: one sample per prompt."""
    return EvalSetConfig(split=split, num_prompts=num_prompts, samples=1, temperature=temperature,
                         max_new_tokens=max_new_tokens)
