"""Tiny end-to-end configs and a CLI runner (each run is a real `erpo-mega train` process)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def tiny_config(run_dir: Path, **over) -> dict:
    cfg = {
        "run_dir": str(run_dir),
        "seed": 3,
        "progress": False,
        "tensorboard": True,
        "model": {"tokenizer": "builtin", "arch": {"arch": "qwen2", "hidden_size": 32, "intermediate_size": 64,
                                                   "num_layers": 2, "num_attention_heads": 4,
                                                   "num_key_value_heads": 2, "max_position_embeddings": 128}},
        "data": {"source": "builtin", "builtin_train_size": 200, "builtin_eval_size": 8,
                 "builtin": {"min_ops": 1, "max_ops": 2}},
        "sft": {"steps": 3, "batch_size": 8,
                "optim": {"lr": 1e-3, "warmup_steps": 0, "total_steps": 10}},
        "rollout": {"prompts_per_step": 3, "samples_per_prompt": 4, "max_new_tokens": 12, "max_concurrency": 4},
        "algo": {"advantage": "erpo"},
        "train": {"steps": 3, "optim": {"lr": 1e-3, "warmup_steps": 0, "total_steps": 10},
                  "parallel": {"micro_batch_tokens": 512}},
        "eval": {"every": 2, "num_prompts": 8},
        "checkpoint": {"every": 1, "keep_last": 5},
    }
    for key, value in over.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def run_cli(*args, timeout=600, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "erpo_mega.cli", *map(str, args)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"erpo-mega {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
