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

# Ports below Linux's ephemeral range (32768+), so an outgoing connection never holds one. Each job
# gets its own block (job id % PORT_SLOTS): router, router metrics, then one port per engine server
# on a node, ENGINE_PORT_STRIDE apart.
PORT_BASE, PORT_SLOTS, PORT_BLOCK, ENGINE_PORT_STRIDE = 30000, 100, 24, 2
MAX_ENGINES_PER_NODE = (PORT_BLOCK - 2) // ENGINE_PORT_STRIDE
API_KEY_PLACEHOLDER = "<api-key>"  # what a dry run prints instead of the job's secret


@dataclass(frozen=True)
class LaunchSpec:
    """What the job script asked for (its variables at the top)."""

    nodes: list[str]
    job_id: int = 0
    placement: str = "disaggregated"
    rollout_nodes: int | None = None  # disaggregated only; None: half the nodes (rollouts dominate RL steps)
    tasks_per_node: int = 8          # one training rank per GPU (or per CPU slot on CPU)
    gpus_per_node: int = 0           # 0: a CPU job (no GPU binding); else each rank gets one, each engine ENGINE_TP
    tp: int | None = None            # None: leave parallel sizes to the config file
    pp: int | None = None
    engine: str = "sglang"
    engine_tp: int = 1
    engine_deterministic: bool = False  # SGLang honours sampling_seed only with --enable-deterministic-inference
    model_dir: str = ""
    config: str = ""
    train_cmd: str | None = None     # default: erpo-mega train CONFIG
    extra_overrides: list[str] = field(default_factory=list)
    engine_args: str = ""            # extra flags appended to every engine command
    node_addrs: dict[str, str] = field(default_factory=dict)  # Slurm NodeAddr per node; missing: the name
    api_key: str = ""                # per-job secret for engines and router ("" = none)
    cpus_per_node: int | None = None  # CPUs the job holds per node (Slurm); splits them between tasks
    cpus_per_task: int | None = None  # CPUS_PER_TASK: training ranks' share, overriding the split
    router_port: int | None = None
    engine_port: int | None = None
    master_port: int | None = None
    run_dir: str = ""                # passed to the trainer as run_dir=, so its outputs sit beside the logs


@dataclass(frozen=True)
class EngineServer:
    """One rollout server: dp 1, ENGINE_TP devices, its own port (SGLang's weight-update endpoints
    assert dp_size == 1, so data parallelism is several servers behind the router)."""

    node: str
    index: int                # on its node
    host: str                 # the node's address: the server binds here and is reached here
    port: int
    gpus: tuple[int, ...]     # node-local GPU indices (CUDA_VISIBLE_DEVICES); () on CPU jobs

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def name(self) -> str:
        return f"engine{self.index}@{self.node}"


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
    engines: list[EngineServer]
    router_node: str | None
    router_host: str | None
    router_port: int
    router_metrics_port: int
    engine_port: int          # the first engine port of a node; the others follow ENGINE_PORT_STRIDE apart
    engines_per_node: int
    train_cpus_per_task: int | None
    engine_cpus_per_task: int | None

    @property
    def engine_urls(self) -> list[str]:
        return [e.url for e in self.engines]

    def addr(self, node: str) -> str:
        return self.spec.node_addrs.get(node) or node


@dataclass(frozen=True)
class JobPorts:
    master: int
    router: int
    router_metrics: int
    engine: int  # first engine port; engine i of a node: engine + ENGINE_PORT_STRIDE * i


def job_ports(job_id: int) -> JobPorts:
    """Ports derived from the job id, so two jobs sharing a node (or a rerun while the old job's
    sockets linger in TIME_WAIT) do not collide: none is a fixed default (the router's metrics
    port included)."""
    base = PORT_BASE + (job_id % PORT_SLOTS) * PORT_BLOCK
    return JobPorts(master=20000 + job_id % 10000, router=base, router_metrics=base + 1, engine=base + 2)


def _positive(key: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise PlanError(key, f"must be >= 1, got {value}")


def make_plan(spec: LaunchSpec) -> Plan:
    if spec.placement not in PLACEMENTS:
        raise PlanError("PLACEMENT", f"must be one of {PLACEMENTS}, got {spec.placement!r}")
    if spec.engine not in ENGINES:
        raise PlanError("ENGINE", f"must be one of {ENGINES}, got {spec.engine!r}")
    for key, value in (("TASKS_PER_NODE", spec.tasks_per_node), ("TP", spec.tp), ("PP", spec.pp),
                       ("ENGINE_TP", spec.engine_tp), ("CPUS_PER_TASK", spec.cpus_per_task)):
        _positive(key, value)
    if spec.gpus_per_node < 0:
        raise PlanError("GPUS_PER_NODE", f"must be >= 0, got {spec.gpus_per_node}")
    if spec.gpus_per_node and spec.tasks_per_node > spec.gpus_per_node:
        raise PlanError("TASKS_PER_NODE", f"one training rank per GPU: {spec.tasks_per_node} ranks per node "
                                          f"but GPUS_PER_NODE={spec.gpus_per_node}")
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

    if spec.engine == "embedded" and spec.engine_tp != 1:
        raise PlanError("ENGINE_TP", f"the embedded engine runs one rank per server; use 1 (got {spec.engine_tp})")
    # Engine slots of a node: its GPUs, or on a CPU job its task slots. One server per ENGINE_TP of them.
    slots = spec.gpus_per_node or spec.tasks_per_node
    engines_per_node = 0
    if engine_nodes:
        if slots % spec.engine_tp:
            what = "GPUs" if spec.gpus_per_node else "task slots"
            raise PlanError("ENGINE_TP", f"must divide the {what} per node ({slots}), got {spec.engine_tp}")
        engines_per_node = slots // spec.engine_tp
        if engines_per_node > MAX_ENGINES_PER_NODE:
            raise PlanError("ENGINE_TP", f"{engines_per_node} engine servers per node exceed the {MAX_ENGINES_PER_NODE} "
                                         f"ports a job reserves per node; raise ENGINE_TP")

    world = len(train_nodes) * spec.tasks_per_node
    model_parallel = (spec.tp or 1) * (spec.pp or 1)
    if world % model_parallel:
        raise PlanError("TP", f"TP*PP = {model_parallel} must divide the training world size {world} "
                              f"({len(train_nodes)} nodes x {spec.tasks_per_node} tasks)")

    ports = job_ports(spec.job_id)
    engine_port = spec.engine_port or ports.engine
    router_port = spec.router_port or ports.router

    def addr(node: str) -> str:
        return spec.node_addrs.get(node) or node

    engines = [
        EngineServer(node=node, index=i, host=addr(node), port=engine_port + ENGINE_PORT_STRIDE * i,
                     gpus=tuple(range(i * spec.engine_tp, (i + 1) * spec.engine_tp)) if spec.gpus_per_node else ())
        for node in engine_nodes for i in range(engines_per_node)
    ]
    # The router sits beside the engines (the first engine node): its traffic is all to them.
    router_node = engine_nodes[0] if engine_nodes else None

    train_cpt = spec.cpus_per_task
    engine_cpt = None
    if spec.cpus_per_node:
        if train_cpt is None:
            train_cpt = max(1, spec.cpus_per_node // spec.tasks_per_node)
        if engines_per_node:
            engine_cpt = max(1, spec.cpus_per_node // engines_per_node)
    if train_cpt and spec.cpus_per_node and train_cpt * spec.tasks_per_node > spec.cpus_per_node:
        raise PlanError("CPUS_PER_TASK", f"{train_cpt} CPUs x {spec.tasks_per_node} ranks per node exceed the "
                                         f"{spec.cpus_per_node} CPUs the job holds per node")

    return Plan(
        spec=spec, train_nodes=train_nodes, engine_nodes=engine_nodes, master_addr=addr(train_nodes[0]),
        master_port=spec.master_port or ports.master, world_size=world, dp=world // model_parallel,
        router_url=f"http://{addr(router_node)}:{router_port}" if router_node else None,
        engines=engines, router_node=router_node, router_host=addr(router_node) if router_node else None,
        router_port=router_port, router_metrics_port=router_port + 1 if spec.router_port else ports.router_metrics,
        engine_port=engine_port, engines_per_node=engines_per_node,
        train_cpus_per_task=train_cpt, engine_cpus_per_task=engine_cpt,
    )


# ----------------------------------------------------------------------------- commands


def erpo_mega_cli() -> list[str]:
    """The `erpo-mega` console script when installed, else the module from this Python."""
    exe = shutil.which("erpo-mega")
    return [exe] if exe else [sys.executable, "-m", "erpo_mega.cli"]


def split_args(key: str, text: str) -> list[str]:
    """shlex.split with the job-script variable named when the quoting is broken."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise PlanError(key, f"cannot split {text!r} into arguments: {exc} (unbalanced quotes?)") from None


def engine_command(plan: Plan, server: EngineServer, api_key: str | None = None) -> list[str]:
    """One rollout server (same flags for SGLang and the embedded engine): dp 1, ENGINE_TP ranks,
    bound to its node's cluster address. `api_key` defaults to the spec's (dry runs print a
    placeholder instead of the secret)."""
    spec = plan.spec
    if spec.engine == "sglang":
        cmd = [sys.executable, "-m", "sglang.launch_server"]
    else:
        # `erpo-mega serve` runs the same module; called directly so no CLI layer sits between the
        # SGLang-compatible flags and their parser.
        cmd = [sys.executable, "-m", "erpo_mega.rollout.serve"]
    cmd += ["--model-path", spec.model_dir, "--tp-size", str(spec.engine_tp),
            "--host", server.host, "--port", str(server.port)]
    key = spec.api_key if api_key is None else api_key
    if key:
        cmd += ["--api-key", key]
    if spec.engine == "sglang" and spec.engine_deterministic:
        cmd += ["--enable-deterministic-inference"]  # else SGLang ignores per-request sampling_seed
    if spec.placement == "colocated":
        cmd += ["--enable-memory-saver"]  # engine releases GPU memory while the trainer steps
    return cmd + split_args("ENGINE_ARGS", spec.engine_args)


# cache_aware routes requests that share a prefix (a GRPO group: one prompt, n samples) to one
# worker, which prefills the prompt once; round_robin would spread the group over every worker.
ROUTER_POLICY = "cache_aware"


def router_command(plan: Plan, api_key: str | None = None) -> list[str]:
    """sglang-router on the first engine node, bound to its address, metrics on the job's own port.
    Workers' /health runs a one-token generation on SGLang (>= 1 s): its check timeout has room."""
    assert plan.router_host is not None
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", plan.router_host,
           "--port", str(plan.router_port), "--worker-urls", *plan.engine_urls, "--policy", ROUTER_POLICY,
           "--prometheus-host", plan.router_host, "--prometheus-port", str(plan.router_metrics_port),
           "--health-check-timeout-secs", "30"]
    key = plan.spec.api_key if api_key is None else api_key
    if key:
        cmd += ["--api-key", key]
    return cmd


def train_command(plan: Plan) -> list[str]:
    """Trainer argv plus the overrides only the launcher knows (engines, parallel sizes, run dir),
    in the keys of erpo_mega/run_config.py."""
    spec = plan.spec
    if spec.train_cmd:
        cmd = split_args("TRAIN_CMD", spec.train_cmd)
        if not cmd:
            raise PlanError("TRAIN_CMD", "is blank")
    else:
        if not spec.config:
            raise PlanError("CONFIG", "no trainer config given (and no TRAIN_CMD)")
        cmd = [*erpo_mega_cli(), "train", spec.config]
    overrides = []
    if spec.run_dir:
        overrides.append(f"run_dir={spec.run_dir}")
    if spec.model_dir:
        overrides.append(f"model.init_from={spec.model_dir}")  # start from the weights the engines serve
    if plan.engines:
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
    """The dry-run report: `key=value` lines, stable so scripts and tests can parse them.
    The api key is never printed: commands show API_KEY_PLACEHOLDER in its place."""
    spec = plan.spec
    lines = [
        f"placement={spec.placement}",
        f"engine={spec.engine}",
        f"nodes={','.join(spec.nodes)}",
        f"node_addrs={','.join(plan.addr(n) for n in spec.nodes)}",
        f"train_nodes={','.join(plan.train_nodes)}",
        f"engine_nodes={','.join(plan.engine_nodes)}",
        f"master_addr={plan.master_addr}",
        f"master_port={plan.master_port}",
        f"world_size={plan.world_size}",
        f"tasks_per_node={spec.tasks_per_node}",
        f"gpus_per_node={spec.gpus_per_node}",
        f"tp={spec.tp if spec.tp is not None else 'config'}",
        f"pp={spec.pp if spec.pp is not None else 'config'}",
        f"dp={plan.dp}",
        f"engine_tp={spec.engine_tp}",
        f"engines_per_node={plan.engines_per_node}",
        f"router_url={plan.router_url or ''}",
        f"router_metrics_port={plan.router_metrics_port if plan.router_url else ''}",
        f"engine_urls={','.join(plan.engine_urls)}",
        f"train_cpus_per_task={plan.train_cpus_per_task or ''}",
        f"engine_cpus_per_task={plan.engine_cpus_per_task or ''}",
    ]
    rank = 0
    for node in spec.nodes:
        roles = []
        if node in plan.train_nodes:
            roles.append(f"train[ranks {rank}-{rank + spec.tasks_per_node - 1}]")
            rank += spec.tasks_per_node
        for e in plan.engines:
            if e.node == node:
                gpus = f" gpus {','.join(map(str, e.gpus))}" if e.gpus else ""
                roles.append(f"engine{e.index}[:{e.port}{gpus}]")
        if node == plan.router_node:
            roles.append(f"router[:{plan.router_port}]")
        lines.append(f"node {node}={' '.join(roles) or 'idle'}")
    key = API_KEY_PLACEHOLDER if spec.api_key else ""
    for e in plan.engines:
        lines.append(f"engine_cmd {e.name}={shlex.join(engine_command(plan, e, api_key=key))}")
    if plan.engines:
        lines.append(f"router_cmd={shlex.join(router_command(plan, api_key=key))}")
    lines.append(f"train_cmd={shlex.join(train_command(plan))}")
    return lines
