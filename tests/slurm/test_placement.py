"""Dry runs of the job scripts and the placement rules: no Slurm needed, so these always run."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "slurm"))
from placement import LaunchSpec, PlanError, expand_hostlist_builtin, make_plan  # noqa: E402


def dry_run(script: str, nodelist: str, **env_vars: str) -> tuple[int, dict[str, str], str]:
    """Run a job script with DRY_RUN=1 outside Slurm; parse its key=value lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ERPO_"))}
    env.pop("DRY_RUN", None)
    env.update(DRY_RUN="1", ERPO_NODELIST=nodelist, SLURM_JOB_ID="4242", PYTHON=sys.executable, **env_vars)
    res = subprocess.run(["bash", str(REPO / script)], env=env, capture_output=True, text=True, timeout=60)
    fields = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    return res.returncode, fields, res.stderr


def test_7b_two_nodes_disaggregated():
    rc, f, err = dry_run("slurm/erpo_7b.sh", "gpu[07-08]")
    assert rc == 0, err
    assert f["placement"] == "disaggregated"
    assert f["train_nodes"] == "gpu07" and f["engine_nodes"] == "gpu08"
    assert f["node gpu07"] == "train[ranks 0-7] router[:30242]"
    assert f["node gpu08"] == "engine[:31242]"
    assert (f["world_size"], f["tp"], f["pp"], f["dp"]) == ("8", "2", "1", "4")
    assert (f["master_addr"], f["master_port"]) == ("gpu07", "24242")  # 20000 + 4242 % 10000
    assert f["router_url"] == "http://gpu07:30242"
    assert f["engine_urls"] == "http://gpu08:31242"
    cmd = f["train_cmd"]
    assert "train examples/erpo_qwen2.5_7b.yaml" in cmd
    assert "rollout.engine=external" in cmd and "rollout.router_url=http://gpu07:30242" in cmd
    assert """'rollout.engine_urls=["http://gpu08:31242"]'""" in cmd
    assert "train.parallel.tp=2 train.parallel.pp=1" in cmd
    assert "model.init_from=/models/Qwen2.5-7B-Instruct" in cmd
    assert f"run_dir={REPO}/runs/erpo-4242" in cmd
    # one SGLang server per rollout node drives its 8 GPUs: tp 1 x dp 8
    assert "--tp 1" in f["engine_cmd"] and "--dp-size 8" in f["engine_cmd"]
    assert "--enable-memory-saver" not in f["engine_cmd"]


def test_7b_four_nodes_half_serve_by_default():
    rc, f, err = dry_run("slurm/erpo_7b.sh", "gpu[01-03],gpu10")
    assert rc == 0, err
    assert f["train_nodes"] == "gpu01,gpu02" and f["engine_nodes"] == "gpu03,gpu10"
    assert (f["world_size"], f["dp"]) == ("16", "8")
    assert f["node gpu02"] == "train[ranks 8-15]"
    assert f["engine_urls"] == "http://gpu03:31242,http://gpu10:31242"
    assert "--worker-urls http://gpu03:31242 http://gpu10:31242" in f["router_cmd"]
    assert """'rollout.engine_urls=["http://gpu03:31242", "http://gpu10:31242"]'""" in f["train_cmd"]


def test_7b_four_nodes_one_rollout_node_tp4_pp2():
    rc, f, err = dry_run("slurm/erpo_7b.sh", "n[1-4]", ROLLOUT_NODES="1", TP="4", PP="2")
    assert rc == 0, err
    assert f["train_nodes"] == "n1,n2,n3" and f["engine_nodes"] == "n4"
    assert (f["world_size"], f["tp"], f["pp"], f["dp"]) == ("24", "4", "2", "3")
    assert f["node n3"] == "train[ranks 16-23]"


def test_7b_colocated_engines_on_every_training_node():
    rc, f, err = dry_run("slurm/erpo_7b.sh", "gpu[01-02]", PLACEMENT="colocated", ENGINE_TP="2")
    assert rc == 0, err
    assert f["train_nodes"] == f["engine_nodes"] == "gpu01,gpu02"
    assert f["world_size"] == "16"
    assert f["node gpu01"] == "train[ranks 0-7] engine[:31242] router[:30242]"
    assert "--tp 2" in f["engine_cmd"] and "--dp-size 4" in f["engine_cmd"]
    assert "--enable-memory-saver" in f["engine_cmd"]


@pytest.mark.parametrize("env, key", [
    ({"ROLLOUT_NODES": "2"}, "ROLLOUT_NODES"),       # nothing left to train on
    ({"TP": "3"}, "TP"),                             # 3 does not divide 8 ranks
    ({"ENGINE_TP": "3"}, "ENGINE_TP"),
    ({"PLACEMENT": "sideways"}, "PLACEMENT"),
])
def test_bad_settings_fail_naming_the_variable(env, key):
    rc, _, err = dry_run("slurm/erpo_7b.sh", "gpu[01-02]", **env)
    assert rc == 2
    assert key in err


def test_tiny_cpu_script_default_lets_the_trainer_own_its_engine():
    rc, f, err = dry_run("slurm/erpo_tiny_cpu.sh", "localhost")
    assert rc == 0, err
    assert f["engine"] == "none" and f["engine_nodes"] == "" and f["router_url"] == ""
    assert f["train_nodes"] == "localhost" and f["world_size"] == "2"
    assert f["train_cmd"].endswith(f"train examples/tiny_cpu.yaml run_dir={REPO}/runs/erpo-4242")


def test_tiny_cpu_script_with_launcher_started_embedded_engine():
    rc, f, err = dry_run("slurm/erpo_tiny_cpu.sh", "localhost", ENGINE="embedded", MODEL_DIR="/m")
    assert rc == 0, err
    assert f["placement"] == "colocated" and f["engine"] == "embedded"
    assert f["train_nodes"] == f["engine_nodes"] == "localhost"
    assert " -m erpo_mega.rollout.serve --model-path /m " in f["engine_cmd"]
    assert "model.init_from=/m rollout.engine=external" in f["train_cmd"]
    assert "rollout.router_url=http://localhost:30242" in f["train_cmd"]


def test_real_launch_refuses_the_dry_run_node_list():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(ERPO_NODELIST="node[1-2]", DRY_RUN="0")
    res = subprocess.run([sys.executable, str(REPO / "slurm/launch.py"), "--engine", "none", "--config", "x.yaml"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "ERPO_NODELIST" in res.stderr


@pytest.mark.parametrize("text, expected", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu[8-10],login1", ["gpu8", "gpu9", "gpu10", "login1"]),
    ("r[1-2]-n[08-09]", ["r1-n08", "r1-n09", "r2-n08", "r2-n09"]),
    ("a[001-002],b[3]", ["a001", "a002", "b3"]),
])
def test_builtin_hostlist_expander(text, expected):
    assert expand_hostlist_builtin(text) == expected


@pytest.mark.parametrize("text", ["node[01-03", "node01]", "node[a-b]", "node[5-3]"])
def test_builtin_hostlist_expander_rejects_malformed(text):
    with pytest.raises(PlanError, match="nodelist"):
        expand_hostlist_builtin(text)


def test_engine_none_trains_on_every_node_without_router():
    plan = make_plan(LaunchSpec(nodes=["a", "b"], engine="none", tasks_per_node=4, job_id=12345))
    assert plan.train_nodes == ["a", "b"] and plan.engine_nodes == []
    assert plan.router_url is None and plan.world_size == 8
    assert plan.master_port == 22345


@pytest.mark.parametrize("script, nodelist, env", [
    ("slurm/erpo_7b.sh", "gpu[01-04]", {}),
    ("slurm/erpo_tiny_cpu.sh", "localhost", {"ENGINE": "embedded", "MODEL_DIR": "/m"}),
])
def test_launcher_overrides_are_valid_trainer_config(script, nodelist, env):
    """The contract with the trainer: the command the launcher builds loads as a RunConfig
    and carries the plan's engines and parallel sizes."""
    run_config = pytest.importorskip("erpo_mega.run_config")
    rc, f, err = dry_run(script, nodelist, **env)
    assert rc == 0, err
    argv = shlex.split(f["train_cmd"])
    config_path, overrides = argv[argv.index("train") + 1], argv[argv.index("train") + 2:]
    cfg = run_config.load_run_config(str(REPO / config_path), overrides)
    assert cfg.rollout.engine == "external"
    assert cfg.rollout.engine_urls == f["engine_urls"].split(",")
    assert cfg.rollout.router_url == f["router_url"]
    assert cfg.model.init_from == env.get("MODEL_DIR", "/models/Qwen2.5-7B-Instruct")
    assert cfg.run_dir == f["run_dir"]
    if f["tp"] != "config":
        assert (cfg.train.parallel.tp, cfg.train.parallel.pp) == (int(f["tp"]), int(f["pp"]))
