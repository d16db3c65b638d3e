"""Children die with the trainer, whatever kills it (issue 14: a kill -9 of the trainer left its
engine server and torch_shm_manager running, ~460 MB per crash on the tiny model)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from erpo_mega.observe.metrics import read_metrics
from tests.e2e.conftest import REPO, cli_env, tiny_config, write_config


def _alive(pid: int) -> bool:
    """Running, i.e. not gone and not a zombie waiting for a reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_dead(pids, timeout=15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


PARENT = textwrap.dedent("""
    import subprocess, sys, threading, time
    from erpo_mega.parallel.lifeline import popen_kwargs
    child = [sys.executable, "-c", "import time\\nfrom erpo_mega.parallel.lifeline import watch_parent\\n"
             "watch_parent(0.2)\\ntime.sleep(600)"] if sys.argv[1] == "watchdog" else ["sleep", "600"]
    procs = []
    def launch():
        procs.append(subprocess.Popen(child, **popen_kwargs()))
    if sys.argv[2] == "thread":  # launched from a worker thread that then ends
        t = threading.Thread(target=launch); t.start(); t.join()
    else:
        launch()
    print(procs[0].pid, flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("child,where", [("plain", "main"), ("watchdog", "main"), ("watchdog", "thread")])
def test_child_dies_when_parent_is_killed(child, where):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, child, where], cwd=REPO, env=cli_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        kid = int(parent.stdout.readline())
        time.sleep(1.0)
        assert _alive(kid), "the child died while its parent lives (e.g. with the launching thread)"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_dead([kid], timeout=10) == [], "child outlived its SIGKILLed parent"
    finally:
        parent.kill()
        for p in _children(parent.pid):
            os.kill(p, signal.SIGKILL)


@pytest.mark.slow  # a real trainer until its first RL step (~30-50 s)
def test_kill9_trainer_takes_engine_and_shm_manager_with_it(tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(
        run_dir, **{"sft.steps": 0, "train.steps": 200, "eval.every": 0, "eval.num_prompts": 2,
                    "checkpoint.every": 0}))
    trainer = subprocess.Popen([sys.executable, "-m", "erpo_mega.cli", "train", str(cfg)], cwd=REPO,
                               env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # after a full step: engine up, weights shared and synced
            rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
            if any(r["split"] == "train" for r in rows):
                break
            assert trainer.poll() is None, "trainer exited early"
            time.sleep(0.5)
        kids = _children(trainer.pid)
        names = {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80] for p in kids}
        assert any("erpo_mega.rollout.serve" in n for n in names.values()), names
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        survivors = _wait_dead(kids, timeout=15)
        assert survivors == [], f"orphans after kill -9: {[names.get(p) for p in survivors]}"
    finally:
        trainer.kill()
        for p in kids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
