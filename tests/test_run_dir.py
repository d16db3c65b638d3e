"""Run directories: a new run never lands on an old one, pruning keeps what `latest` names,
resume drops only the rows it redoes, and a finished SFT is reused only for its own config.

Each test reproduces a way a run directory lost data or trained the wrong model (issue 14).
"""

import hashlib
import json
from pathlib import Path

import pytest

from erpo_mega.observe.metrics import MetricsWriter, read_metrics
from erpo_mega.run_config import load_run_config
from erpo_mega.run_dir import RunDirError, check_new_run, prune_checkpoints
from erpo_mega.trainer import Trainer, _check_sft_cache, run_from_cli

from .e2e.conftest import tiny_config, write_config


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _old_run(run_dir: Path) -> None:
    (run_dir / "checkpoints" / "iter_0000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "iter_0000002" / "train_state.json").write_text("{}")
    (run_dir / "checkpoints" / "latest").write_text("iter_0000002\n")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train", "loss": 0.5}) + "\n")
    (run_dir / "config.yaml").write_text("seed: 3\n")


def test_train_without_resume_refuses_an_existing_run_and_changes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _old_run(run_dir)
    before = _tree_digest(run_dir)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(run_dir))
    rc = run_from_cli(str(cfg), [], mode="train")
    err = capsys.readouterr().err
    assert rc == 2
    assert "already holds a run" in err and "--resume" in err and "metrics.jsonl" in err
    assert "Traceback" not in err
    assert _tree_digest(run_dir) == before


def test_a_run_that_failed_during_setup_may_be_started_again(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("seed: 3\n")
    (run_dir / "metrics.jsonl").write_text("")  # opened, nothing logged
    check_new_run(run_dir, resume=False)  # no error
    _old_run(run_dir)
    with pytest.raises(RunDirError, match="checkpoints/"):
        check_new_run(run_dir, resume=False)
    check_new_run(run_dir, resume=True)


def test_prune_is_numeric_and_never_deletes_what_latest_names(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("iter_0000002", "iter_0000001"):  # an old run's iter 2, the new run's iter 1
        (root / name).mkdir(parents=True)
    (root / "latest").write_text("iter_0000001\n")
    prune_checkpoints(root, keep=1)
    assert (root / "iter_0000001").is_dir(), "pruned the checkpoint `latest` names"
    # numeric order: 8-digit iteration numbers sort after 7-digit ones
    for name in ("iter_9999999", "iter_10000000"):
        (root / name).mkdir()
    (root / "latest").write_text("iter_10000000\n")
    prune_checkpoints(root, keep=2)
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_10000000", "iter_9999999"]


def test_resume_truncation_keeps_sft_rows(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for s in range(1, 7):
        w.log(s, {"nll": float(s)}, split="sft")
    w.log(0, {"acc": 0.1}, split="eval")
    for s in range(1, 5):
        w.log(s, {"loss": float(s)})
        if s % 2 == 0:
            w.log(s, {"acc": 0.2}, split="eval")
    w.close()
    MetricsWriter(tmp_path, tensorboard=False, resume_step=2).close()
    rows = [(r["split"], r["step"]) for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert [s for sp, s in rows if sp == "sft"] == [1, 2, 3, 4, 5, 6]
    assert [s for sp, s in rows if sp == "train"] == [1, 2]
    assert [s for sp, s in rows if sp == "eval"] == [0, 2]


def test_finished_sft_is_refused_when_its_config_changed(tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(run_dir))
    sft_root = run_dir / "sft"
    sft_root.mkdir(parents=True)
    old = Trainer(load_run_config(str(cfg), ["sft.steps=2"]))._sft_key()
    (sft_root / "erpo_source.json").write_text(json.dumps(old))
    _check_sft_cache(sft_root, old)  # same config: reused
    new = Trainer(load_run_config(str(cfg), ["sft.steps=40"]))._sft_key()
    with pytest.raises(RunDirError, match=r"sft\.steps: 2 -> 40"):
        _check_sft_cache(sft_root, new)
    other_init = Trainer(load_run_config(str(cfg), ["sft.steps=2", "model.arch.hidden_size=64"]))._sft_key()
    with pytest.raises(RunDirError, match=r"model\.arch"):
        _check_sft_cache(sft_root, other_init)
