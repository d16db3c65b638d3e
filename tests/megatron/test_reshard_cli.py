"""`python -m erpo_mega.megatron.reshard` as users run it (issue 13, defect 7): a routine
(sharded-optimizer) checkpoint becomes a reshardable one with the same step, extra and
weights; a bad path is one clear line and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from erpo_mega.parallel.spawn import run_distributed

REPO = Path(__file__).resolve().parents[2]


def _save(root: str) -> None:
    from tests.megatron.cases import LOSS, TEMPERATURE, _first_batch, _setup

    worker = _setup(1, 1, budget=40)
    batch, *_ = _first_batch(worker)
    worker.train_step(batch, LOSS, temperature=TEMPERATURE)
    worker.save(root, extra={"cursor": 5})


def _cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "erpo_mega.megatron.reshard", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_reshard_cli_rewrites_sharded_checkpoint(tmp_path):
    src, dst = tmp_path / "ckpt", tmp_path / "resharded"
    run_distributed(_save, 1, str(src))
    proc = _cli(src, dst)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((src / "iter_0000001" / "train_state.json").read_text())
    b = json.loads((dst / "iter_0000001" / "train_state.json").read_text())
    assert (a["optimizer_format"], b["optimizer_format"]) == ("sharded", "reshardable")
    assert b["step"] == 1 and b["extra"] == {"cursor": 5} and b["scheduler"] == a["scheduler"]
    assert (dst / "latest").read_text().strip() == "iter_0000001"


def test_reshard_cli_bad_path_is_one_clear_line(tmp_path):
    proc = _cli(tmp_path / "nowhere", tmp_path / "out")
    assert proc.returncode == 2
    assert "nowhere" in proc.stderr and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
