"""Who runs what in a Slurm allocation: pure functions, no processes started.

Kept apart from the supervisor in launch.py so the placement rules (which nodes train, which
serve rollouts, ports, parallel sizes) can be printed by a dry run and checked by tests on a
laptop with no Slurm. Standard library only: job scripts run it before any venv is trusted.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

PLACEMENTS = ("colocated", "disaggregated")
ENGINES = ("sglang", "embedded", "none")


class PlanError(ValueError):
    """A launch setting that cannot work; `key` names the job-script variable to fix."""

    def __init__(self, key: str, msg: str):
        super().__init__(f"{key}: {msg}")
        self.key = key


# ----------------------------------------------------------------------------- node lists

_BRACKET = re.compile(r"\[([^\]]*)\]")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...] ("a[1,3],b" -> ["a[1,3]", "b"])."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise PlanError("nodelist", f"unbalanced ']' in {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise PlanError("nodelist", f"unbalanced '[' in {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_range_set(body: str, source: str) -> list[str]:
    """"01-03,7" -> ["01", "02", "03", "7"]; zero padding follows the lower bound's width."""
    out = []
    for item in body.split(","):
        lo, sep, hi = item.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise PlanError("nodelist", f"bad range {item!r} in {source!r}")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise PlanError("nodelist", f"descending range {item!r} in {source!r}")
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist_builtin(nodelist: str) -> list[str]:
    """Slurm hostlist syntax without Slurm: "gpu[01-02,05],login1" and "r[1-2]-n[1-2]" (cartesian)."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        pieces = _BRACKET.split(item)  # literal, range, literal, range, ..., literal
        choices = [[p] if i % 2 == 0 else _expand_range_set(p, item) for i, p in enumerate(pieces)]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand with `scontrol show hostnames` when it works (exact Slurm semantics), else built in."""
    if not nodelist.strip():
        raise PlanError("nodelist", "empty node list")
    if shutil.which("scontrol"):
        try:
            res = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=10)
            if res.returncode == 0 and res.stdout.split():
                return res.stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return expand_hostlist_builtin(nodelist)


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class LaunchSpec:
    """What the job script asked for (its variables at the top)."""

    nodes: list[str]
    job_id: int = 0
    placement: str = "disaggregated"
    rollout_nodes: int | None = None  # disaggregated only; None: half the nodes (rollouts dominate RL steps)
    tasks_per_node: int = 8          # one training rank per GPU (or per CPU slot on CPU)
    tp: int | None = None            # None: leave parallel sizes to the config file
    pp: int | None = None
    engine: str = "sglang"
    engine_tp: int = 1
    model_dir: str = ""
    config: str = ""
    train_cmd: str | None = None     # default: erpo-mega train CONFIG
    extra_overrides: list[str] = field(default_factory=list)
    engine_args: str = ""            # extra flags appended to every engine command
    router_port: int | None = None
    engine_port: int | None = None
    master_port: int | None = None
    run_dir: str = ""                # passed to the trainer as run_dir=, so its outputs sit beside the logs


@dataclass(frozen=True)
class Plan:
    spec: LaunchSpec
    train_nodes: list[str]
    engine_nodes: list[str]
    master_addr: str
    master_port: int
    world_size: int
    dp: int
    router_url: str | None
    engine_urls: list[str]
    engine_port: int
    router_port: int


def job_ports(job_id: int) -> tuple[int, int, int]:
    """(master, router, engine) ports derived from the job id, so two jobs sharing a node
    (or a rerun while the old job's sockets linger in TIME_WAIT) do not collide."""
    return 20000 + job_id % 10000, 30000 + job_id % 1000, 31000 + job_id % 1000


def _positive(key: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise PlanError(key, f"must be >= 1, got {value}")


def make_plan(spec: LaunchSpec) -> Plan:
    if spec.placement not in PLACEMENTS:
        raise PlanError("PLACEMENT", f"must be one of {PLACEMENTS}, got {spec.placement!r}")
    if spec.engine not in ENGINES:
        raise PlanError("ENGINE", f"must be one of {ENGINES}, got {spec.engine!r}")
    for key, value in (("TASKS_PER_NODE", spec.tasks_per_node), ("TP", spec.tp), ("PP", spec.pp),
                       ("ENGINE_TP", spec.engine_tp)):
        _positive(key, value)
    if not spec.nodes:
        raise PlanError("nodelist", "no nodes in the allocation")
    if len(set(spec.nodes)) != len(spec.nodes):
        raise PlanError("nodelist", f"duplicate node names in {spec.nodes}")

    nodes = list(spec.nodes)
    if spec.engine == "none":
        train_nodes, engine_nodes = nodes, []
    elif spec.placement == "colocated":
        train_nodes, engine_nodes = nodes, nodes
    else:
        n_roll = spec.rollout_nodes if spec.rollout_nodes is not None else max(1, len(nodes) // 2)
        if not 1 <= n_roll < len(nodes):
            raise PlanError("ROLLOUT_NODES", f"disaggregated placement needs 1 <= ROLLOUT_NODES < number of "
                                             f"nodes ({len(nodes)}), got {n_roll}")
        train_nodes, engine_nodes = nodes[:-n_roll], nodes[-n_roll:]

    if spec.engine == "sglang" and spec.tasks_per_node % spec.engine_tp:
        raise PlanError("ENGINE_TP", f"must divide the GPUs per node ({spec.tasks_per_node}), got {spec.engine_tp}")

    world = len(train_nodes) * spec.tasks_per_node
    model_parallel = (spec.tp or 1) * (spec.pp or 1)
    if world % model_parallel:
        raise PlanError("TP", f"TP*PP = {model_parallel} must divide the training world size {world} "
                              f"({len(train_nodes)} nodes x {spec.tasks_per_node} tasks)")

    master_port, router_port, engine_port = job_ports(spec.job_id)
    engine_port = spec.engine_port or engine_port
    router_port = spec.router_port or router_port
    engine_urls = [f"http://{n}:{engine_port}" for n in engine_nodes]
    return Plan(
        spec=spec, train_nodes=train_nodes, engine_nodes=engine_nodes, master_addr=train_nodes[0],
        master_port=spec.master_port or master_port, world_size=world, dp=world // model_parallel,
        router_url=f"http://{nodes[0]}:{router_port}" if engine_nodes else None,
        engine_urls=engine_urls, engine_port=engine_port, router_port=router_port,
    )


# ----------------------------------------------------------------------------- commands


def erpo_mega_cli() -> list[str]:
    """The `erpo-mega` console script when installed, else the module from this Python."""
    exe = shutil.which("erpo-mega")
    return [exe] if exe else [sys.executable, "-m", "erpo_mega.cli"]


def engine_command(plan: Plan) -> list[str]:
    """The rollout server started on each engine node (same flags for SGLang and the embedded engine)."""
    spec = plan.spec
    if spec.engine == "sglang":
        cmd = [sys.executable, "-m", "sglang.launch_server"]
    else:
        # `erpo-mega serve` runs the same module; called directly so no CLI layer sits between the
        # SGLang-compatible flags and their parser.
        cmd = [sys.executable, "-m", "erpo_mega.rollout.serve"]
    cmd += ["--model-path", spec.model_dir, "--tp", str(spec.engine_tp),
            "--host", "0.0.0.0", "--port", str(plan.engine_port)]
    engine_dp = spec.tasks_per_node // spec.engine_tp
    if spec.engine == "sglang" and engine_dp > 1:
        cmd += ["--dp-size", str(engine_dp)]  # one server per node drives all of its GPUs
    if spec.placement == "colocated":
        cmd += ["--enable-memory-saver"]  # engine releases GPU memory while the trainer steps
    return cmd + shlex.split(spec.engine_args)


def router_command(plan: Plan) -> list[str]:
    return [sys.executable, "-m", "sglang_router.launch_router", "--host", "0.0.0.0",
            "--port", str(plan.router_port), "--worker-urls", *plan.engine_urls, "--policy", "round_robin"]


def train_command(plan: Plan) -> list[str]:
    """Trainer argv plus the overrides only the launcher knows (engines, parallel sizes, run dir),
    in the keys of erpo_mega/run_config.py."""
    spec = plan.spec
    if spec.train_cmd:
        cmd = shlex.split(spec.train_cmd)
    else:
        if not spec.config:
            raise PlanError("CONFIG", "no trainer config given (and no TRAIN_CMD)")
        cmd = [*erpo_mega_cli(), "train", spec.config]
    overrides = []
    if spec.run_dir:
        overrides.append(f"run_dir={spec.run_dir}")
    if spec.model_dir:
        overrides.append(f"model.init_from={spec.model_dir}")  # start from the weights the engines serve
    if plan.engine_nodes:
        # Engines were started here: the trainer connects to them (weight updates go to each
        # engine, generation to the router) instead of starting its own.
        overrides += ["rollout.engine=external", f"rollout.engine_urls={json.dumps(plan.engine_urls)}",
                      f"rollout.router_url={plan.router_url}"]
    if spec.tp is not None:
        overrides.append(f"train.parallel.tp={spec.tp}")
    if spec.pp is not None:
        overrides.append(f"train.parallel.pp={spec.pp}")
    return cmd + overrides + list(spec.extra_overrides)


def describe(plan: Plan) -> list[str]:
    """The dry-run report: `key=value` lines, stable so scripts and tests can parse them."""
    spec = plan.spec
    lines = [
        f"placement={spec.placement}",
        f"engine={spec.engine}",
        f"nodes={','.join(spec.nodes)}",
        f"train_nodes={','.join(plan.train_nodes)}",
        f"engine_nodes={','.join(plan.engine_nodes)}",
        f"master_addr={plan.master_addr}",
        f"master_port={plan.master_port}",
        f"world_size={plan.world_size}",
        f"tasks_per_node={spec.tasks_per_node}",
        f"tp={spec.tp if spec.tp is not None else 'config'}",
        f"pp={spec.pp if spec.pp is not None else 'config'}",
        f"dp={plan.dp}",
        f"engine_tp={spec.engine_tp}",
        f"router_url={plan.router_url or ''}",
        f"engine_urls={','.join(plan.engine_urls)}",
    ]
    rank = 0
    for node in spec.nodes:
        roles = []
        if node in plan.train_nodes:
            roles.append(f"train[ranks {rank}-{rank + spec.tasks_per_node - 1}]")
            rank += spec.tasks_per_node
        if node in plan.engine_nodes:
            roles.append(f"engine[:{plan.engine_port}]")
        if plan.router_url and node == spec.nodes[0]:
            roles.append(f"router[:{plan.router_port}]")
        lines.append(f"node {node}={' '.join(roles) or 'idle'}")
    if plan.engine_nodes:
        lines.append(f"engine_cmd={shlex.join(engine_command(plan))}")
        lines.append(f"router_cmd={shlex.join(router_command(plan))}")
    lines.append(f"train_cmd={shlex.join(train_command(plan))}")
    return lines
