"""What a run directory may be reused for: nothing is overwritten, pruned or reused by accident.

Three rules, each from a way a run directory lost data or trained the wrong model:
* a new run refuses a directory that already holds a run (metrics, checkpoints, SFT);
  `--resume` is the only way to continue one;
* checkpoints are pruned by iteration number (not by name), and never the one `latest` names;
* a cache a run builds for itself (the finished SFT warm start under `sft/`) records what it
  was built from; when the config now says otherwise it is refused (SFT is a trained
  artefact: silently reusing it would train from the wrong start). `model.init_from` HF dirs
  are read directly by every rank, so there is no converted copy to go stale.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

SOURCE_KEY = "erpo_source.json"
_ITER = re.compile(r"^iter_(\d+)$")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says why and what to do."""


def existing_run_contents(run_dir: Path) -> list[str]:
    """What in `run_dir` belongs to an earlier run (empty: safe to start a new run there).

    A run that failed during set-up leaves `config.yaml`, the tokenizer and an empty
    `metrics.jsonl`; those are not worth protecting, so restarting after fixing the config works.
    """
    found = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    for sub in ("checkpoints", "sft"):
        d = run_dir / sub
        if d.is_dir() and any(d.iterdir()):
            found.append(f"{sub}/")
    for name in ("summary.json", "final_hf"):
        if (run_dir / name).exists():
            found.append(name)
    return found


def check_new_run(run_dir: str | Path, resume: bool) -> None:
    """Refuse to start a new run over an earlier one (before anything is written)."""
    run_dir = Path(run_dir)
    if resume:
        return
    found = existing_run_contents(run_dir)
    if found:
        raise RunDirError(f"run_dir {run_dir} already holds a run ({', '.join(found)}); nothing was changed. "
                          "Continue it with --resume, or choose another run_dir (e.g. run_dir=runs/new)")


# ---------------------------------------------------------------- checkpoint pruning -----------


def iteration_of(path: Path) -> int | None:
    m = _ITER.match(path.name)
    return int(m.group(1)) if m else None


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the `keep` highest-numbered `iter_N` dirs; never the one `latest` names.

    Returns what was deleted. Ordering is numeric, so `iter_10000000` (8 digits) sorts after
    `iter_9999999`, and a foreign `iter_N` left from an earlier run is just another number.
    """
    root = Path(root)
    protected = None
    latest = root / "latest"
    if latest.is_file():
        protected = latest.read_text().strip()
    iters = sorted((iteration_of(p), p) for p in root.glob("iter_*") if p.is_dir() and iteration_of(p) is not None)
    doomed = [p for _, p in iters[:-keep] if p.name != protected] if keep > 0 else []
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def complete_checkpoints(root: str | Path) -> list[Path]:
    """`iter_N` dirs under `root`, newest first (complete or not; the loader verifies)."""
    root = Path(root)
    its = [(iteration_of(p), p) for p in root.glob("iter_*") if p.is_dir() and iteration_of(p) is not None]
    return [p for _, p in sorted(its, reverse=True)]


# ---------------------------------------------------------------- cache keys -------------------


def read_key(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / SOURCE_KEY
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_key(cache_dir: Path, key: dict) -> None:
    path = Path(cache_dir) / SOURCE_KEY
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(key, indent=1, sort_keys=True))
    os.replace(tmp, path)


def key_differences(old: dict | None, new: dict) -> list[str]:
    """Top-level keys whose values differ (all of `new` when there is no old key)."""
    if old is None:
        return ["(no record of what it was built from)"]
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


# ---------------------------------------------------------------- resume -----------------------


def pick_resume_checkpoint(root: str | Path, fallback: bool) -> Path:
    """The checkpoint `--resume` loads: the one `latest` names, verified file by file.

    When it is damaged (a missing or truncated file, no manifest: a save killed half-way or
    a disk that filled up) the error names the file; with `fallback` the newest complete
    older `iter_N` is used instead, and a warning names both.
    """
    import logging

    from erpo_mega.megatron.checkpoint import (
        CheckpointError,
        read_train_state,
        resolve_checkpoint,
        verify_checkpoint_files,
    )

    root = Path(root)
    try:
        target = resolve_checkpoint(root)
        verify_checkpoint_files(target)
        read_train_state(target)
        return target
    except CheckpointError as e:
        damaged, error = e, str(e)
    if not fallback:
        raise CheckpointError(f"{error}. To resume from the newest complete earlier checkpoint instead, "
                              "set checkpoint.resume_fallback=true") from None
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    for cand in complete_checkpoints(root):
        if cand.name == latest:
            continue
        try:
            verify_checkpoint_files(cand)
            read_train_state(cand)
        except CheckpointError:
            continue
        logging.getLogger("erpo_mega.run_dir").warning(
            "--resume: %s; falling back to %s (checkpoint.resume_fallback)", error, cand)
        return cand
    raise CheckpointError(f"{error}; no complete earlier checkpoint under {root} to fall back to") from damaged
