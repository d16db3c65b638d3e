"""Prompt datasets: the built-in task, JSONL and parquet files, all mapped to `PromptItem`.

File rows come in three common shapes, picked by `style` (or detected from the first row):
    math   {"problem": str, "solution": "... \\boxed{ans} ..."}    (an "answer" field wins if present)
    gsm8k  {"question": str, "answer": "... #### 42"}
    dapo   {"prompt": str | [{"role", "content"}...], "reward_model": {"ground_truth": ...}}  (or "answer")
`prompt_field` / `answer_fields` (dotted paths) override the style's fields for other layouts.

A bad row (invalid JSON, missing field, wrong type, no extractable answer) is reported as
`FILE:LINE: reason`; `on_bad_row=error` raises at the first one, `skip` drops it with a warning
and counts it in `LoadResult.bad_rows`, so nothing is lost without a trace.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erpo_mega.config import ConfigError, bounds, choices
from erpo_mega.data.answers import gsm8k_answer, last_boxed
from erpo_mega.data.builtin_task import ArithmeticTask, ArithmeticTaskConfig
from erpo_mega.data.types import DataError, PromptItem

STYLES = ("auto", "math", "gsm8k", "dapo", "custom")
_ROLES = ("system", "user", "assistant")

# style -> (prompt field, [(answer field, extraction)]); the first answer field present wins.
_STYLE_FIELDS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "math": ("problem", [("answer", "raw"), ("solution", "boxed")]),
    "gsm8k": ("question", [("answer", "gsm8k")]),
    "dapo": ("prompt", [("reward_model.ground_truth", "raw"), ("answer", "raw")]),
}


@dataclass
class DataConfig:
    """Where prompts come from and how they become model input."""

    source: str = field(default="builtin", metadata=choices("builtin", "jsonl", "parquet"))
    # File path for jsonl/parquet; may contain `{split}` (e.g. data/gsm8k_{split}.jsonl).
    path: str | None = None
    split: str = field(default="train", metadata=choices("train", "validation", "test"))
    style: str = field(default="auto", metadata=choices(*STYLES))
    prompt_field: str | None = None
    answer_fields: list[str] | None = None
    # How to read the answer from `answer_fields` when they are given: as is, last \boxed{}, or '#### x'.
    answer_extract: str = field(default="raw", metadata=choices("raw", "boxed", "gsm8k"))
    on_bad_row: str = field(default="error", metadata=choices("skip", "error"))
    seed: int = 0
    builtin: ArithmeticTaskConfig = field(default_factory=ArithmeticTaskConfig)
    builtin_train_size: int = field(default=20000, metadata=bounds(ge=1))
    builtin_eval_size: int = field(default=500, metadata=bounds(ge=1))
    use_chat_template: bool = True
    system_prompt: str | None = None
    # `{prompt}` is replaced by the prompt text (for chat prompts: the last user message).
    prompt_template: str = "{prompt}"
    max_prompt_len: int = field(default=512, metadata=bounds(ge=1))

    def __post_init__(self) -> None:
        if self.source != "builtin" and not self.path:
            raise ConfigError("path", f"is required when source is '{self.source}'")
        if "{prompt}" not in self.prompt_template:
            raise ConfigError("prompt_template", f"must contain '{{prompt}}', got {self.prompt_template!r}")
        if self.style == "custom" and (not self.prompt_field or not self.answer_fields):
            raise ConfigError("style", "'custom' needs both prompt_field and answer_fields")


@dataclass(frozen=True)
class BadRow:
    path: str
    line: int
    reason: str
    unit: str = "line"  # "line" for JSONL, "row" (1-based) for parquet

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.unit == "line" else f"{self.path}:row {self.line}"
        return f"{where}: {self.reason}"


@dataclass
class LoadResult:
    items: list[PromptItem]
    bad_rows: list[BadRow] = field(default_factory=list)
    style: str = "builtin"
    path: str | None = None

    @property
    def skipped(self) -> int:
        return len(self.bad_rows)


class DataWarning(UserWarning):
    """Rows were skipped (see the message for file:line of each)."""


class _RowError(Exception):
    pass


def resolve_path(cfg: DataConfig, split: str | None = None) -> Path:
    return Path(cfg.path.replace("{split}", split or cfg.split))


def load_prompts(cfg: DataConfig, split: str | None = None) -> LoadResult:
    """All prompts of `split` (default `cfg.split`) from the configured source."""
    split = split or cfg.split
    if cfg.source == "builtin":
        task = ArithmeticTask(cfg.builtin, seed=cfg.seed)
        n = cfg.builtin_train_size if split == "train" else cfg.builtin_eval_size
        return LoadResult(task.items(split, n), style="builtin")
    path = resolve_path(cfg, split)
    rows = _iter_jsonl(path) if cfg.source == "jsonl" else _iter_parquet(path)
    unit = "line" if cfg.source == "jsonl" else "row"
    return _map_rows(rows, cfg, path, unit)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed row or None, error) for each non-blank line."""
    try:
        fh = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open JSONL file: {e.strerror or e}") from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, f"not UTF-8 text ({e.reason} at byte {e.start})"
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as e:
                yield lineno, None, f"invalid JSON: {e.msg} at column {e.colno}"


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: parquet file not found")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read parquet file: {e}") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield i, row, None


def _style_fields(cfg: DataConfig, style: str) -> tuple[str, list[tuple[str, str]]]:
    prompt_field, answers = _STYLE_FIELDS.get(style, (None, []))
    if cfg.prompt_field:
        prompt_field = cfg.prompt_field
    if cfg.answer_fields:
        answers = [(f, cfg.answer_extract) for f in cfg.answer_fields]
    return prompt_field, answers


def detect_style(row: dict, path: Path) -> str:
    for style, key in (("math", "problem"), ("gsm8k", "question"), ("dapo", "prompt")):
        if key in row:
            return style
    raise DataError(f"{path}: cannot tell the dataset style from the first row's fields {sorted(row)}; "
                    "set data.style or data.prompt_field/data.answer_fields")


def _map_rows(rows: Iterator[tuple[int, Any, str | None]], cfg: DataConfig, path: Path,
              unit: str) -> LoadResult:
    items: list[PromptItem] = []
    bad: list[BadRow] = []
    style = cfg.style
    if style == "auto" and (cfg.prompt_field or cfg.answer_fields):
        style = "custom" if cfg.prompt_field and cfg.answer_fields else "auto"
    fields: tuple[str, list[tuple[str, str]]] | None = None
    for lineno, row, error in rows:
        if error is None and not isinstance(row, dict):
            error = f"expected a JSON object, got {type(row).__name__}"
        if error is None:
            if fields is None:
                if style == "auto":
                    style = detect_style(row, path)
                fields = _style_fields(cfg, style)
            try:
                items.append(_row_to_item(row, fields, style, path, lineno))
                continue
            except _RowError as e:
                error = str(e)
        bad_row = BadRow(str(path), lineno, error, unit)
        if cfg.on_bad_row == "error":
            raise DataError(f"{bad_row} (set data.on_bad_row=skip to skip bad rows)")
        bad.append(bad_row)
    if bad:
        shown = "\n  ".join(str(b) for b in bad[:5])
        more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        warnings.warn(f"skipped {len(bad)} bad row(s) of {path}:\n  {shown}{more}", DataWarning, stacklevel=3)
    if not items:
        raise DataError(f"{path}: no usable rows ({len(bad)} bad)" + (f"; first: {bad[0]}" if bad else ""))
    return LoadResult(items, bad, style, str(path))


def _get(row: dict, dotted: str) -> Any:
    node: Any = row
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _check_prompt(value: Any, name: str) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(f"field '{name}' is empty")
        return value
    if isinstance(value, list) and value:
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise _RowError(f"field '{name}[{i}]' must be an object with string 'role' and 'content'")
            if m["role"] not in _ROLES:
                raise _RowError(f"field '{name}[{i}].role' must be one of {list(_ROLES)}, got {m['role']!r}")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise _RowError(f"field '{name}' must be a string or a non-empty list of chat messages, "
                    f"got {type(value).__name__}")


def _extract_answer(value: Any, name: str, how: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _RowError(f"field '{name}' must be a string or number, got {type(value).__name__}")
    text = str(value).strip()
    if how == "boxed":
        out = last_boxed(text)
        if out is None:
            raise _RowError(f"field '{name}' has no \\boxed{{...}} answer")
        return out
    if how == "gsm8k":
        out = gsm8k_answer(text)
        if out is None:
            raise _RowError(f"field '{name}' has no '#### <answer>' line")
        return out
    if not text:
        raise _RowError(f"field '{name}' is empty")
    return text


def _row_to_item(row: dict, fields: tuple[str, list[tuple[str, str]]], style: str, path: Path,
                 lineno: int) -> PromptItem:
    prompt_field, answers = fields
    prompt = _get(row, prompt_field)
    if prompt is None:
        raise _RowError(f"missing field '{prompt_field}'")
    prompt = _check_prompt(prompt, prompt_field)
    for name, how in answers:
        value = _get(row, name)
        if value is not None:
            answer = _extract_answer(value, name, how)
            break
    else:
        names = ", ".join(f"'{n}'" for n, _ in answers)
        raise _RowError(f"missing field {names}" if len(answers) == 1 else f"missing field: one of {names}")
    return PromptItem(prompt, answer, {"source": str(path), "line": lineno, "style": style})
