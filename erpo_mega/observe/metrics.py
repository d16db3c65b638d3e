"""Per-step metrics to JSONL (the source of truth) and TensorBoard (for people).

JSONL is append-only and flushed each step, so a killed run keeps every finished step; on
resume the writer truncates rows past the resumed step, so curves never double back.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path


def _plain(v):
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible rather than failing the write
    return v


_RESERVED = ("step", "split", "time")


class MetricsWriter:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None,
                 resume_splits: tuple[str, ...] = ("train", "eval")):
        """`resume_step`: drop the rows of `resume_splits` past that step (the resumed run redoes
        them). Other splits are another phase's rows with their own step counter (SFT's steps
        1..N are not RL steps) and stay."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step, resume_splits)
        self._fh = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))
            except Exception:  # tensorboard missing or broken: JSONL still has everything
                self._tb = None

    def _truncate_after(self, step: int, splits: tuple[str, ...]) -> None:
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed process
            if row.get("split", "train") not in splits or row.get("step", -1) <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    def log(self, step: int, metrics: dict, split: str = "train") -> dict:
        row = {f"metric/{k}" if k in _RESERVED else k: _plain(v) for k, v in metrics.items()}
        row.update(step=step, split=split, time=time.time())  # the row's own keys always win
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k in ("step", "time", "split") or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                self._tb.add_scalar(f"{split}/{k}", v, step)
            self._tb.flush()
        return row

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl (a torn last line from a killed run is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class PhaseTimer:
    """Wall time and tokens/s per phase of a step (rollout, logprob, train, sync)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def metrics(self, tokens: dict[str, int] | None = None) -> dict:
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        for k, n in (tokens or {}).items():
            if self.seconds.get(k):
                out[f"tokens_per_s/{k}"] = n / self.seconds[k]
        return out
