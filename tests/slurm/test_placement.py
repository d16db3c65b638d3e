"""Dry runs of the job scripts and the placement rules: no Slurm needed, so these always run."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "slurm"))
from launch import (  # noqa: E402
    _GPU_SHIM,
    gpu_bound,
    job_cpus_per_node,
    node_addresses,
    parse_node_addrs,
    srun_step,
    write_api_key,
)
from placement import (  # noqa: E402
    PORT_BLOCK,
    LaunchSpec,
    PlanError,
    expand_hostlist_builtin,
    job_ports,
    make_plan,
)

SCRIPTS = ("slurm/erpo_7b.sh", "slurm/erpo_twin_cpu.sh", "slurm/erpo_tiny_cpu.sh")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A directory that looks like an HF model (the launcher refuses one without config.json)."""
    d = tmp_path_factory.mktemp("hf") / "Qwen2.5-7B-Instruct"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return str(d)


def dry_run(script: str, nodelist: str, **env_vars: str) -> tuple[int, dict[str, str], str]:
    """Run a job script with DRY_RUN=1 outside Slurm; parse its key=value lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ERPO_"))}
    env.pop("DRY_RUN", None)
    env.update(DRY_RUN="1", ERPO_NODELIST=nodelist, SLURM_JOB_ID="4242", PYTHON=sys.executable, **env_vars)
    res = subprocess.run(["bash", str(REPO / script)], env=env, capture_output=True, text=True, timeout=60)
    fields = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    return res.returncode, fields, res.stderr


def engine_cmds(f: dict[str, str]) -> dict[str, list[str]]:
    return {k.split(" ", 1)[1]: shlex.split(v) for k, v in f.items() if k.startswith("engine_cmd ")}


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# Job 4242: port slot 42 -> router 30000 + 42*24 = 31008, metrics 31009, engines 31010, 31012, ...
ROUTER, METRICS, ENGINE0 = 31008, 31009, 31010


def test_7b_two_nodes_one_server_per_gpu_behind_the_router(model_dir):
    rc, f, err = dry_run("slurm/erpo_7b.sh", "gpu[07-08]", MODEL_DIR=model_dir)
    assert rc == 0, err
    assert f["placement"] == "disaggregated"
    assert f["train_nodes"] == "gpu07" and f["engine_nodes"] == "gpu08"
    assert f["node gpu07"] == "train[ranks 0-7]"
    assert f["node gpu08"] == " ".join(f"engine{i}[:{ENGINE0 + 2 * i} gpus {i}]" for i in range(8)) + \
        f" router[:{ROUTER}]"
    assert (f["world_size"], f["tp"], f["pp"], f["dp"], f["engines_per_node"]) == ("8", "2", "1", "4", "8")
    assert (f["master_addr"], f["master_port"]) == ("gpu07", "24242")  # 20000 + 4242 % 10000
    assert f["router_url"] == f"http://gpu08:{ROUTER}" and f["router_metrics_port"] == str(METRICS)
    urls = [f"http://gpu08:{ENGINE0 + 2 * i}" for i in range(8)]
    assert f["engine_urls"] == ",".join(urls)
    cmds = engine_cmds(f)
    assert list(cmds) == [f"engine{i}@gpu08" for i in range(8)]
    for i, argv in enumerate(cmds.values()):
        assert argv[1:3] == ["-m", "sglang.launch_server"]
        assert flag(argv, "--tp-size") == "1" and "--dp-size" not in argv and "--tp" not in argv
        assert (flag(argv, "--host"), flag(argv, "--port")) == ("gpu08", str(ENGINE0 + 2 * i))
        assert flag(argv, "--api-key") == "<api-key>"  # the secret itself is never printed
        assert "--enable-memory-saver" not in argv and "--enable-deterministic-inference" not in argv
    router = shlex.split(f["router_cmd"])
    assert flag(router, "--host") == "gpu08" and flag(router, "--prometheus-host") == "gpu08"
    assert flag(router, "--prometheus-port") == str(METRICS) and flag(router, "--api-key") == "<api-key>"
    assert router[router.index("--worker-urls") + 1:router.index("--policy")] == urls
    cmd = f["train_cmd"]
    assert "train examples/erpo_qwen2.5_7b.yaml" in cmd
    assert "rollout.engine=external" in cmd and f"rollout.router_url=http://gpu08:{ROUTER}" in cmd
    assert "train.parallel.tp=2 train.parallel.pp=1" in cmd
    assert f"model.init_from={model_dir}" in cmd and f"run_dir={REPO}/runs/erpo-4242" in cmd
    assert "0.0.0.0" not in "\n".join(f.values())


def test_7b_engine_tp_splits_each_node_into_gpu_sets(model_dir):
    rc, f, err = dry_run("slurm/erpo_7b.sh", "gpu[01-04]", MODEL_DIR=model_dir, ENGINE_TP="4")
    assert rc == 0, err
    assert f["engine_nodes"] == "gpu03,gpu04" and f["engines_per_node"] == "2"
    assert f["node gpu03"] == f"engine0[:{ENGINE0} gpus 0,1,2,3] engine1[:{ENGINE0 + 2} gpus 4,5,6,7] router[:{ROUTER}]"
    assert f["node gpu04"] == f"engine0[:{ENGINE0} gpus 0,1,2,3] engine1[:{ENGINE0 + 2} gpus 4,5,6,7]"
    assert f["engine_urls"] == ",".join(f"http://{n}:{p}" for n in ("gpu03", "gpu04") for p in (ENGINE0, ENGINE0 + 2))
    assert all(flag(a, "--tp-size") == "4" for a in engine_cmds(f).values())


def test_7b_four_nodes_one_rollout_node_tp4_pp2(model_dir):
    rc, f, err = dry_run("slurm/erpo_7b.sh", "n[1-4]", MODEL_DIR=model_dir, ROLLOUT_NODES="1", TP="4", PP="2")
    assert rc == 0, err
    assert f["train_nodes"] == "n1,n2,n3" and f["engine_nodes"] == "n4"
    assert (f["world_size"], f["tp"], f["pp"], f["dp"]) == ("24", "4", "2", "3")
    assert f["node n3"] == "train[ranks 16-23]"


def test_7b_colocated_engines_share_the_training_gpus(model_dir):
    rc, f, err = dry_run("slurm/erpo_7b.sh", "gpu[01-02]", MODEL_DIR=model_dir, PLACEMENT="colocated",
                         ENGINE_TP="2", ENGINE_DETERMINISTIC="1")
    assert rc == 0, err
    assert f["train_nodes"] == f["engine_nodes"] == "gpu01,gpu02"
    assert f["world_size"] == "16" and f["engines_per_node"] == "4"
    assert f["node gpu01"].startswith(f"train[ranks 0-7] engine0[:{ENGINE0} gpus 0,1] ")
    for argv in engine_cmds(f).values():
        assert flag(argv, "--tp-size") == "2" and "--dp-size" not in argv
        assert "--enable-memory-saver" in argv and "--enable-deterministic-inference" in argv


def test_twin_has_the_7b_shape_on_cpu(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    rc, f, err = dry_run("slurm/erpo_twin_cpu.sh", "n[1-2]", MODEL_DIR=str(tmp_path))
    assert rc == 0, err
    assert (f["train_nodes"], f["engine_nodes"], f["gpus_per_node"]) == ("n1", "n2", "0")
    assert (f["world_size"], f["tp"], f["dp"], f["engines_per_node"]) == ("2", "2", "1", "2")
    assert f["node n2"] == f"engine0[:{ENGINE0}] engine1[:{ENGINE0 + 2}] router[:{ROUTER}]"
    assert all(a[1:3] == ["-m", "erpo_mega.rollout.serve"] for a in engine_cmds(f).values())
    assert "train examples/twin_cpu.yaml" in f["train_cmd"]


def test_job_scripts_differ_only_in_their_variables():
    """The twin in CI is a proof about the 7B job only if everything but the variables is shared."""
    bodies = {s: (REPO / s).read_text().split("# ---- end of variables", 1) for s in SCRIPTS}
    assert all(len(parts) == 2 for parts in bodies.values()), "marker line missing"
    assert len({parts[1] for parts in bodies.values()}) == 1
    variables = [set(re.findall(r"^([A-Z_]+)=", parts[0], re.M)) for parts in bodies.values()]
    assert variables[0] == variables[1], "the 7B job and its twin set different variables"


@pytest.mark.parametrize("env, key", [
    ({"ROLLOUT_NODES": "2"}, "ROLLOUT_NODES"),       # nothing left to train on
    ({"TP": "3"}, "TP"),                             # 3 does not divide 8 ranks
    ({"ENGINE_TP": "3"}, "ENGINE_TP"),
    ({"PLACEMENT": "sideways"}, "PLACEMENT"),
    ({"TASKS_PER_NODE": "9"}, "TASKS_PER_NODE"),     # more ranks than GPUs
    ({"ENGINE": "embedded", "ENGINE_TP": "2"}, "ENGINE_TP"),  # the embedded engine is one rank
])
def test_bad_settings_fail_naming_the_variable(model_dir, env, key):
    rc, _, err = dry_run("slurm/erpo_7b.sh", "gpu[01-02]", MODEL_DIR=model_dir, **env)
    assert rc == 2
    assert key in err


@pytest.mark.parametrize("env, expected", [
    ({"ENGINE_TIMEOUT": "abc"}, "ENGINE_TIMEOUT: must be a number of seconds, got 'abc'"),
    ({"ENGINE_TIMEOUT": "-5"}, "ENGINE_TIMEOUT: must be > 0"),
    ({"ENGINE_ARGS": "--mem-fraction-static '0.7"}, "ENGINE_ARGS: cannot split"),
    ({"TRAIN_CMD": 'python -c "print(1)'}, "TRAIN_CMD: cannot split"),
    ({"CONFIG": "examples/no_such.yaml"}, "CONFIG: no such file: examples/no_such.yaml"),
    ({"MODEL_DIR": "/no/such/model"}, "MODEL_DIR: no such directory: /no/such/model"),
    ({"MODEL_DIR": str(REPO / "examples")}, "has no config.json"),
    ({"ENGINE_DETERMINISTIC": "maybe"}, "ENGINE_DETERMINISTIC: must be 0 or 1"),
    ({"TP": "two"}, "TP: must be an integer"),
])
def test_bad_input_is_one_clear_line_without_traceback(model_dir, env, expected):
    env = {"MODEL_DIR": model_dir, **env}
    rc, f, err = dry_run("slurm/erpo_7b.sh", "gpu[01-02]", **env)
    assert rc == 2, (f, err)
    assert err.strip().splitlines() == [err.strip()] and "Traceback" not in err, err
    assert err.startswith("launch: error: ") and expected in err, err
    assert not f, "nothing may be planned from bad input"


def test_tiny_cpu_script_default_lets_the_trainer_own_its_engine():
    rc, f, err = dry_run("slurm/erpo_tiny_cpu.sh", "localhost")
    assert rc == 0, err
    assert f["engine"] == "none" and f["engine_nodes"] == "" and f["router_url"] == ""
    assert f["train_nodes"] == "localhost" and f["world_size"] == "2"
    assert f["train_cmd"].endswith(f"train examples/tiny_cpu.yaml run_dir={REPO}/runs/erpo-4242")


def test_tiny_cpu_script_with_launcher_started_embedded_engines(model_dir):
    rc, f, err = dry_run("slurm/erpo_tiny_cpu.sh", "localhost", ENGINE="embedded", MODEL_DIR=model_dir)
    assert rc == 0, err
    assert f["placement"] == "colocated" and f["engine"] == "embedded"
    assert f["train_nodes"] == f["engine_nodes"] == "localhost" and f["engines_per_node"] == "2"
    for argv in engine_cmds(f).values():
        assert argv[1:5] == ["-m", "erpo_mega.rollout.serve", "--model-path", model_dir]
    assert f"model.init_from={model_dir} rollout.engine=external" in f["train_cmd"]
    assert f"rollout.router_url=http://localhost:{ROUTER}" in f["train_cmd"]


def test_resume_flag_reaches_the_trainer(model_dir):
    rc, f, err = dry_run("slurm/erpo_7b.sh", "gpu[01-02]", MODEL_DIR=model_dir, SLURM_RESTART_COUNT="1")
    assert rc == 0, err
    assert shlex.split(f["train_cmd"])[-1] == "--resume"  # a requeued job continues its run


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
    assert plan.train_nodes == ["a", "b"] and plan.engine_nodes == [] and plan.engines == []
    assert plan.router_url is None and plan.world_size == 8
    assert plan.master_port == 22345


def test_addresses_come_from_node_addr_not_names():
    plan = make_plan(LaunchSpec(nodes=["n1", "n2"], engine="embedded", tasks_per_node=2, job_id=7,
                                node_addrs={"n1": "10.0.0.11", "n2": "10.0.0.12"}))
    assert plan.master_addr == "10.0.0.11"
    assert plan.router_url == f"http://10.0.0.12:{30000 + 7 * PORT_BLOCK}"
    assert [e.url for e in plan.engines] == [f"http://10.0.0.12:{30000 + 7 * PORT_BLOCK + 2 + 2 * i}"
                                             for i in range(2)]


def test_parse_scontrol_node_addrs():
    out = ("NodeName=n1 Arch=x86_64 CoresPerSocket=1 CPUAlloc=0 CPUTot=4 NodeAddr=127.0.0.1 NodeHostName=localhost "
           "Version=22.05.8\nNodeName=gpu-a12 Arch=x86_64 NodeAddr=ib-a12.cluster NodeHostName=a12\n")
    assert parse_node_addrs(out) == {"n1": "127.0.0.1", "gpu-a12": "ib-a12.cluster"}


@pytest.mark.parametrize("value, expected", [("16", 16), ("128(x4)", 128), ("16(x2),8", 8), ("", None)])
def test_job_cpus_per_node(value, expected):
    assert job_cpus_per_node(value) == expected


def test_cpus_per_task_split_and_checked():
    spec = dict(nodes=["a", "b"], engine="sglang", tasks_per_node=8, gpus_per_node=8, engine_tp=2)
    plan = make_plan(LaunchSpec(**spec, cpus_per_node=128))
    assert (plan.train_cpus_per_task, plan.engine_cpus_per_task) == (16, 32)  # 8 ranks, 4 servers per node
    assert make_plan(LaunchSpec(**spec, cpus_per_node=128, cpus_per_task=4)).train_cpus_per_task == 4
    with pytest.raises(PlanError, match="CPUS_PER_TASK"):
        make_plan(LaunchSpec(**spec, cpus_per_node=16, cpus_per_task=4))


def test_ports_unique_within_a_job_and_between_neighbouring_jobs():
    def ports(job_id: int) -> set[int]:
        plan = make_plan(LaunchSpec(nodes=["a", "b"], engine="sglang", tasks_per_node=8, gpus_per_node=8,
                                    job_id=job_id))
        got = [plan.router_port, plan.router_metrics_port, plan.master_port] + [e.port for e in plan.engines
                                                                                 if e.node == "b"]
        assert len(got) == len(set(got)) == 11
        assert all(1024 < p < 32768 for p in got)  # below Linux's ephemeral range
        return set(got)

    for a in range(1000, 1100):
        assert not ports(a) & ports(a + 1), a
    assert job_ports(3).router_metrics != 29000  # not sglang-router's fixed default


@pytest.mark.parametrize("step_gpus, want, expected", [
    ("", "3", "3"),                 # Slurm set nothing: node-local index
    ("4,5,6,7", "1", "5"),          # index into the GPUs Slurm gave the step
    ("0,1,2,3,4,5,6,7", "2,3", "2,3"),
    ("6,7,0,1", "0,1", "6,7"),
])
def test_gpu_shim_binds_each_process_to_its_own_gpus(step_gpus, want, expected):
    env = {"PATH": os.environ["PATH"], "SLURM_LOCALID": want if "," not in want else "0"}
    if step_gpus:
        env["CUDA_VISIBLE_DEVICES"] = step_gpus
    arg = "local" if "," not in want else want
    res = subprocess.run(["bash", "-c", _GPU_SHIM, "x", arg, "bash", "-c", 'echo "$CUDA_VISIBLE_DEVICES"'],
                         env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == expected


def test_gpu_shim_refuses_an_index_the_step_does_not_have():
    res = subprocess.run(["bash", "-c", _GPU_SHIM, "x", "4", "true"], env={"CUDA_VISIBLE_DEVICES": "0,1",
                         "PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=30)
    assert res.returncode == 97 and "GPU index 4" in res.stderr


@pytest.mark.parametrize("script, nodelist, env", [
    ("slurm/erpo_7b.sh", "gpu[01-04]", {}),
    ("slurm/erpo_tiny_cpu.sh", "localhost", {"ENGINE": "embedded"}),
    ("slurm/erpo_twin_cpu.sh", "n[1-2]", {}),
])
def test_launcher_overrides_are_valid_trainer_config(model_dir, script, nodelist, env):
    """The contract with the trainer: the command the launcher builds loads as a RunConfig
    and carries the plan's engines and parallel sizes."""
    run_config = pytest.importorskip("erpo_mega.run_config")
    rc, f, err = dry_run(script, nodelist, MODEL_DIR=model_dir, **env)
    assert rc == 0, err
    argv = shlex.split(f["train_cmd"])
    config_path, overrides = argv[argv.index("train") + 1], argv[argv.index("train") + 2:]
    cfg = run_config.load_run_config(str(REPO / config_path), overrides)
    assert cfg.rollout.engine == "external"
    assert cfg.rollout.engine_urls == f["engine_urls"].split(",")
    assert cfg.rollout.router_url == f["router_url"]
    assert cfg.model.init_from == model_dir
    assert cfg.run_dir == f["run_dir"]
    if f["tp"] != "config":
        assert (cfg.train.parallel.tp, cfg.train.parallel.pp) == (int(f["tp"]), int(f["pp"]))


def test_steps_ask_for_cpus_per_task_and_the_nodes_gpus():
    """Defect 9: every step states its CPUs per task; a GPU step asks for the node's GPUs
    itself (an --exclusive job's steps get none implicitly) and each process is narrowed to its own."""
    cpu = srun_step("train", ["n1"], 2, ["python", "t.py"], "o.log", cpus_per_task=2)
    assert "--cpus-per-task=2" in cpu and not any(a.startswith("--gres") for a in cpu)
    assert cpu[-2:] == ["python", "t.py"] and "--overlap" in cpu and "--kill-on-bad-exit=1" in cpu
    gpu = srun_step("engine0-n2", ["n2"], 1, gpu_bound("2,3", ["sglang"]), "o.log", cpus_per_task=32,
                    gpus_per_node=8)
    assert "--gres=gpu:8" in gpu and "--cpus-per-task=32" in gpu
    assert gpu[gpu.index("erpo-gpu-bind") + 1:] == ["2,3", "sglang"]


def test_api_key_file_is_private_fresh_and_never_looks_like_a_flag(tmp_path):
    keys = set()
    for _ in range(300):  # a token_urlsafe key starts with '-' about once in 64 draws
        key, path = write_api_key(tmp_path)
        assert path.read_text() == key + "\n" and path.stat().st_mode & 0o777 == 0o600
        assert re.fullmatch(r"[0-9a-f]{64}", key)
        keys.add(key)
    assert len(keys) == 300


def test_node_addresses_from_scontrol_or_a_clear_error(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n[ \"$4\" = n1,n2 ] || exit 3\n"
                    "echo 'NodeName=n1 Arch=x86_64 NodeAddr=10.1.0.1 NodeHostName=a'\n"
                    "echo 'NodeName=n2 Arch=x86_64 NodeAddr=10.1.0.2 NodeHostName=b'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert node_addresses(["n1", "n2"], required=True) == {"n1": "10.1.0.1", "n2": "10.1.0.2"}
    with pytest.raises(PlanError, match="no NodeAddr for n3"):  # a real launch never guesses
        node_addresses(["n3"], required=True)
    assert node_addresses(["n3"], required=False) == {"n3": "n3"}  # a dry run away from the cluster
