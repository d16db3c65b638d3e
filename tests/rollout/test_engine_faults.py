"""Engines dying under load (issue 14): behind a router the other engine finishes every request;
an engine of a training run dying stops the run at once with a sentence naming it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from erpo_mega.observe.metrics import read_metrics
from erpo_mega.parallel.dist import free_port
from erpo_mega.rollout.launch import launch_embedded_server, launch_router
from tests.e2e.conftest import REPO, cli_env, tiny_config, write_config
from tests.rollout.helpers import save_tiny_model


@pytest.mark.slow  # two engines + router start-up; ~20 s idle, far more on a loaded machine
def test_one_engine_dying_behind_the_router_does_not_stop_the_others_requests(tmp_path):
    save_tiny_model(tmp_path / "init", "qwen2", seed=0)
    handles = []
    try:
        for i in range(2):
            handles.append(launch_embedded_server(tmp_path / "init", port=free_port(), num_threads=1, wait=False,
                                                  log_path=tmp_path / f"engine{i}.log"))
        for h in handles:
            h.wait_healthy(120)
        router = launch_router([h.url for h in handles], port=free_port(), log_path=tmp_path / "router.log",
                               policy="round_robin",
                               extra_args=["--log-level", "warn", "--shutdown-grace-period-secs", "1"])
        handles.append(router)
        client = router.client(timeout=60, max_retries=3, backoff=0.1)

        def generate(i):
            return client.generate_raw({"input_ids": [5, 17, 33, 8], "sampling_params": {
                "max_new_tokens": 32, "temperature": 1.0, "ignore_eos": True, "sampling_seed": i}})

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(generate, i) for i in range(24)]
            time.sleep(0.3)
            handles[1].process.send_signal(signal.SIGKILL)  # mid-burst
            outs = [f.result(timeout=120) for f in futures]
        assert handles[1].process.wait(10) == -signal.SIGKILL
        assert all(len(o["output_ids"]) == 32 for o in outs)
        assert all(len(generate(100 + i)["output_ids"]) == 32 for i in range(4))  # and afterwards
    finally:
        for h in handles:
            h.close()


def _children(pid: int) -> dict[int, str]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError, IndexError):
                continue
    return out


@pytest.mark.slow  # a real trainer until its first RL step, then the failure (~40-60 s)
def test_engine_killed_mid_run_stops_the_run_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(
        run_dir, **{"sft.steps": 0, "train.steps": 500, "eval.every": 0, "eval.num_prompts": 2,
                    "checkpoint.every": 1, "rollout.request_timeout_s": 60}))
    trainer = subprocess.Popen([sys.executable, "-m", "erpo_mega.cli", "train", str(cfg)], cwd=REPO, env=cli_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
            if any(r["split"] == "train" for r in rows):
                break
            assert trainer.poll() is None, trainer.communicate()[1][-2000:]
            time.sleep(0.3)
        engine = [p for p, cmd in _children(trainer.pid).items() if "erpo_mega.rollout.serve" in cmd]
        assert len(engine) == 1
        import os

        os.kill(engine[0], signal.SIGKILL)
        t0 = time.monotonic()
        out, err = trainer.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        trainer.kill()
    assert trainer.returncode == 1, err[-3000:]
    assert took < 60, f"took {took:.0f} s to notice"
    assert "a rollout engine failed at RL step" in out and "killed by signal 9" in out
    assert "engine0.log" in out and "is intact, continue with --resume" in out
    assert "Traceback" not in out + err
