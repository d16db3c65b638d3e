#!/usr/bin/env python3
"""The one launcher every job script calls from inside its Slurm allocation.

Order: plan placement -> start one rollout engine per engine node (srun steps) -> wait for
/health -> start the router -> start all training ranks in one srun step -> watch everything.
If any rank, engine or the router dies, everything is torn down and the launcher exits
non-zero so the job ends FAILED (not CANCELLED, which would hide that it broke).

Python rather than bash because watching several process groups at once, HTTP health checks
and the placement arithmetic are all simpler and testable here; standard library only.

    python slurm/launch.py --config CFG --placement disaggregated --rollout-nodes 1 --tp 2 ...
    python slurm/launch.py --dry-run ...      # nodes from $ERPO_NODELIST or $SLURM_JOB_NODELIST
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import re
import secrets
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from placement import (  # noqa: E402  (the launcher runs as a script, not from an installed package)
    API_KEY_PLACEHOLDER,
    ENGINES,
    PLACEMENTS,
    LaunchSpec,
    Plan,
    PlanError,
    engine_command,
    expand_hostlist,
    make_plan,
    router_command,
    train_command,
)
from placement import describe as describe_plan  # noqa: E402

_T0 = time.monotonic()

# Sets RANK/WORLD_SIZE/LOCAL_RANK torchrun-style from what srun gives each task, then runs the trainer.
_RANK_SHIM = ('export RANK="$SLURM_PROCID" WORLD_SIZE="$SLURM_NTASKS" LOCAL_RANK="$SLURM_LOCALID" '
              'LOCAL_WORLD_SIZE="$SLURM_NTASKS_PER_NODE" NODE_RANK="$SLURM_NODEID"; exec "$@"')

# GPU binding inside a step: $1 lists node-local GPU indices (a rank's SLURM_LOCALID, an engine's
# ENGINE_TP set; "local": the task's SLURM_LOCALID); they index the GPUs Slurm gave the step (its CUDA_VISIBLE_DEVICES), or the node's
# GPUs when Slurm set none. The process then sees exactly its own GPUs, as device 0.., and no other.
_GPU_SHIM = r'''want=$1; shift
if [ "$want" = local ]; then want=$SLURM_LOCALID; fi
have=${CUDA_VISIBLE_DEVICES-}
IFS=, read -ra got <<< "$have"; IFS=, read -ra idx <<< "$want"; out=
for i in "${idx[@]}"; do
  if [ -z "$have" ]; then out+=${out:+,}$i
  elif [ "$i" -lt "${#got[@]}" ]; then out+=${out:+,}${got[$i]}
  else echo "erpo-gpu-bind: GPU index $i but the step has only CUDA_VISIBLE_DEVICES=$have" >&2; exit 97
  fi
done
export CUDA_VISIBLE_DEVICES=$out
exec "$@"'''


def log(msg: str) -> None:
    print(f"[launch {time.strftime('%H:%M:%S')} +{time.monotonic() - _T0:7.1f}s] {msg}", flush=True)


class LaunchFailed(RuntimeError):
    pass


class Terminated(Exception):
    """SIGTERM/SIGINT reached the launcher (scancel, time limit, Ctrl-C)."""


# ----------------------------------------------------------------------------- network interface


def _iface_ipv4(name: str) -> str | None:
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def detect_ifname(host: str) -> str | None:
    """The local interface that holds the address `host` resolves to (the master node's own name
    resolves to an address of one of its interfaces; loopback names resolve to 'lo')."""
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        return None
    if addr.startswith("127."):
        return "lo"
    for _, name in socket.if_nameindex():
        if _iface_ipv4(name) == addr:
            return name
    return None


def socket_env(plan: Plan) -> dict[str, str]:
    """NCCL/Gloo interface names: keep the user's, else the master's interface, else leave
    NCCL to pick (excluding loopback and docker bridges)."""
    env = {}
    common = os.environ.get("SOCKET_IFNAME")
    detected = common or detect_ifname(plan.master_addr)
    if "NCCL_SOCKET_IFNAME" not in os.environ:
        env["NCCL_SOCKET_IFNAME"] = detected or "^lo,docker"
    if "GLOO_SOCKET_IFNAME" not in os.environ and detected:
        env["GLOO_SOCKET_IFNAME"] = detected
    return env


# ----------------------------------------------------------------------------- processes


class Supervisor:
    """Owns every process the launcher starts; any death while `watch`ing is fatal."""

    def __init__(self, env: dict[str, str], secret: str = ""):
        self.env = env
        self.secret = secret  # never written to the job's output
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, list[Path]] = {}

    def start(self, name: str, argv: list[str], logs: list[Path], capture: Path | None = None) -> None:
        """Start `argv` in its own process group; `logs` are shown on failure; `capture`, if
        given, receives its stdout/stderr (srun steps write their own files instead)."""
        shown = shlex.join(argv)
        log(f"start {name}: {shown.replace(self.secret, API_KEY_PLACEHOLDER) if self.secret else shown}")
        out = open(capture, "ab") if capture else None  # the child keeps its own copy
        try:
            self.procs[name] = subprocess.Popen(argv, env=self.env, start_new_session=True, stdout=out,
                                                stderr=subprocess.STDOUT if out else None)
        finally:
            if out:
                out.close()
        self.logs[name] = logs

    def first_exited(self) -> tuple[str, int] | None:
        for name, proc in self.procs.items():
            rc = proc.poll()
            if rc is not None:
                return name, rc
        return None

    def stop_all(self, grace_s: float = 15.0) -> None:
        live = {n: p for n, p in self.procs.items() if p.poll() is None}
        if not live:
            return
        log(f"stopping {', '.join(live)}")
        for proc in live.values():
            _signal_group(proc, signal.SIGTERM)  # srun forwards it to its remote tasks
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(p.poll() is None for p in live.values()):
            time.sleep(0.1)
        for name, proc in live.items():
            if proc.poll() is None:
                log(f"{name} ignored SIGTERM for {grace_s:.0f}s; SIGKILL")
                _signal_group(proc, signal.SIGKILL)
                proc.wait()

    def print_tails(self, name: str, lines: int = 20, max_files: int = 8) -> None:
        files = []
        for pattern in self.logs.get(name, []):
            files += sorted(pattern.parent.glob(pattern.name)) if "*" in pattern.name else [pattern]
        for path in files[:max_files]:
            if path.is_file():
                text = path.read_text(errors="replace")
                if self.secret:  # SGLang logs its server_args, api key included
                    text = text.replace(self.secret, API_KEY_PLACEHOLDER)
                tail = text.splitlines()[-lines:]
                print(f"----- last {len(tail)} lines of {path} -----", flush=True)
                print("\n".join(tail), flush=True)


def srun_step(name: str, nodes: list[str], ntasks: int, argv: list[str], output: str,
              cpus_per_task: int | None = None, gpus_per_node: int = 0) -> list[str]:
    """srun argv for one job step. --overlap: engine and training steps share the nodes' CPUs
    (colocated) instead of queueing behind each other; -K: one failing task ends the step.
    Each task asks for its CPUs; a GPU step asks for the node's GPUs explicitly (an --exclusive
    job's steps get none by default) and the GPU shim binds each task to its own."""
    extra = [f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []
    if gpus_per_node:
        extra.append(f"--gres=gpu:{gpus_per_node}")
    return ["srun", f"--job-name={name}", "--overlap", "--kill-on-bad-exit=1", "--unbuffered",
            f"--nodes={len(nodes)}", f"--ntasks={ntasks}", f"--ntasks-per-node={ntasks // len(nodes)}",
            f"--nodelist={','.join(nodes)}", f"--output={output}", *extra, *argv]


def gpu_bound(indices: str, argv: list[str]) -> list[str]:
    """argv run with CUDA_VISIBLE_DEVICES narrowed to `indices` (see _GPU_SHIM)."""
    return ["bash", "-c", _GPU_SHIM, "erpo-gpu-bind", indices, *argv]


def write_api_key(run_dir: Path) -> tuple[str, Path]:
    """A fresh per-job secret in RUN_DIR/api_key, mode 600 from its creation (never world-readable).
    Hex, so it never starts with '-' (argparse would take a token_urlsafe key like '-x3...' for a flag)."""
    path = run_dir / "api_key"
    key = secrets.token_hex(32)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, path


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def http_ok(url: str, timeout: float = 2.0, api_key: str = "") -> bool:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(sup: Supervisor, urls: dict[str, str], timeout_s: float, api_key: str = "") -> None:
    """Poll each `name -> base URL` /health until 200; fail early if its process died. SGLang's
    /health runs a one-token generation (>= 1 s once loaded), so each probe gets 10 s."""
    pending = dict(urls)
    deadline = time.monotonic() + timeout_s
    while pending:
        for name, url in list(pending.items()):
            if sup.procs[name].poll() is not None:
                sup.print_tails(name)
                raise LaunchFailed(f"{name} exited with code {sup.procs[name].returncode} before {url}/health "
                                   f"answered")
            if http_ok(f"{url}/health", timeout=10.0, api_key=api_key):
                log(f"{name} healthy at {url}")
                del pending[name]
        if pending and time.monotonic() > deadline:
            for name in pending:
                sup.print_tails(name)
            raise LaunchFailed(f"not healthy after {timeout_s:.0f}s: {', '.join(pending)} (ENGINE_TIMEOUT)")
        if pending:
            time.sleep(0.5)


def wait_router_workers(sup: Supervisor, url: str, n: int, timeout_s: float, api_key: str = "") -> None:
    """Wait until the router lists all `n` workers as healthy (GET /workers). sglang-router answers
    /health before it has registered its workers, and until then it sends every request to the
    ones it has; a router without that endpoint (404) has nothing to wait on."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    seen = 0
    while True:
        if sup.procs["router"].poll() is not None:
            sup.print_tails("router")
            raise LaunchFailed(f"router exited with code {sup.procs['router'].returncode} while registering workers")
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{url}/workers", headers=headers),
                                        timeout=10.0) as resp:
                workers = json.load(resp).get("workers", [])
            seen = sum(1 for w in workers if isinstance(w, dict) and w.get("is_healthy", True))
            if seen >= n:
                log(f"router lists {seen} healthy workers")
                return
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return
        except (urllib.error.URLError, OSError, ValueError, AttributeError):
            pass
        if time.monotonic() > deadline:
            sup.print_tails("router")
            raise LaunchFailed(f"router lists {seen} of {n} workers as healthy after {timeout_s:.0f}s "
                               "(ENGINE_TIMEOUT)")
        time.sleep(0.5)


def log_weight_versions(plan: Plan, api_key: str) -> None:
    """One line per engine with the weight version it serves (GET /model_info): the job's output
    then shows that every engine, not just the one the router happened to pick, got the last sync."""
    for server in plan.engines:
        req = urllib.request.Request(f"{server.url}/model_info",
                                     headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                version = json.load(resp).get("weight_version")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            version = f"unknown ({exc})"
        log(f"{server.name} weight_version={version}")


# ----------------------------------------------------------------------------- main flow


def run(plan: Plan, run_dir: Path, engine_timeout_s: float) -> int:
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(MASTER_ADDR=plan.master_addr, MASTER_PORT=str(plan.master_port), ERPO_RUN_DIR=str(run_dir))
    env.update(socket_env(plan))
    api_key = ""
    if plan.router_url:
        env["ERPO_ROUTER_URL"] = plan.router_url
        # Engines and router refuse requests without this key; the trainer's client reads the file.
        api_key, key_file = write_api_key(run_dir)
        env["ERPO_API_KEY_FILE"] = str(key_file)
        env["ERPO_ENGINE_API_KEY"] = api_key  # what the trainer's EnginePool sends (erpo_mega/orchestration/engines.py)
        plan = dataclasses.replace(plan, spec=dataclasses.replace(plan.spec, api_key=api_key))
    log(f"run dir {run_dir}; MASTER_ADDR={plan.master_addr} MASTER_PORT={plan.master_port} "
        + " ".join(f"{k}={env[k]}" for k in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME") if k in env))
    sup = Supervisor(env, secret=api_key)
    gpus = plan.spec.gpus_per_node

    def on_signal(signum, _frame):
        raise Terminated(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if plan.engines:
            log(f"phase engines: {len(plan.engines)} x {plan.spec.engine} (tp {plan.spec.engine_tp}, dp 1 each) "
                f"on {','.join(plan.engine_nodes)}")
            engine_urls = {}
            for server in plan.engines:
                out = log_dir / f"engine-{server.node}-{server.index}.log"
                argv = engine_command(plan, server)
                if gpus:
                    argv = gpu_bound(",".join(map(str, server.gpus)), argv)
                sup.start(server.name, srun_step(f"engine{server.index}-{server.node}", [server.node], 1, argv,
                                                 str(out), plan.engine_cpus_per_task, gpus), [out])
                engine_urls[server.name] = server.url
            wait_healthy(sup, engine_urls, engine_timeout_s, api_key)
            log(f"phase router on {plan.router_node}")
            router_log = log_dir / "router.log"
            sup.start("router", srun_step("router", [plan.router_node], 1, router_command(plan), str(router_log)),
                      [router_log])
            wait_healthy(sup, {"router": plan.router_url}, 120.0, api_key)
            wait_router_workers(sup, plan.router_url, len(plan.engines), 120.0, api_key)

        log(f"phase train: {plan.world_size} ranks on {','.join(plan.train_nodes)} (dp={plan.dp})")
        argv = ["bash", "-c", _RANK_SHIM, "erpo-rank", *train_command(plan)]
        if gpus:
            argv = gpu_bound("local", argv)  # one GPU per rank: the task's SLURM_LOCALID-th
        pattern = str(log_dir / "train-%N-rank%t.log")
        sup.start("train", srun_step("train", plan.train_nodes, plan.world_size, argv, pattern,
                                     plan.train_cpus_per_task, gpus), [log_dir / "train-*.log"])

        while True:
            exited = sup.first_exited()
            if exited:
                break
            time.sleep(0.5)
        name, rc = exited
        if name == "train" and rc == 0:
            log("phase done: training finished")
            log_weight_versions(plan, api_key)
            sup.stop_all()
            return 0
        log(f"FAILED: {name} exited with code {rc}; tearing everything down")
        sup.print_tails(name)
        sup.stop_all()
        return rc if rc > 0 else 1  # a clean exit of an engine is still a failure; signals are negative
    except LaunchFailed as exc:
        log(f"FAILED: {exc}")
        sup.stop_all()
        return 1
    except Terminated as exc:
        log(f"received {exc}; tearing everything down")
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sup.stop_all(grace_s=5.0)
        return 143


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise PlanError(name, f"must be an integer, got {value!r}") from None


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        out = float(value)
    except ValueError:
        raise PlanError(name, f"must be a number of seconds, got {value!r}") from None
    if not out > 0:
        raise PlanError(name, f"must be > 0, got {value!r}")
    return out


def _env_bool(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise PlanError(name, f"must be 0 or 1, got {os.environ[name]!r}")


_NODE_ADDR = re.compile(r"NodeName=(\S+).*?\bNodeAddr=(\S+)")


def parse_node_addrs(scontrol_output: str) -> dict[str, str]:
    """`scontrol show node -o` -> {NodeName: NodeAddr}, one node per line."""
    return {m.group(1): m.group(2) for m in map(_NODE_ADDR.search, scontrol_output.splitlines()) if m}


def node_addresses(nodes: list[str], required: bool) -> dict[str, str]:
    """Each node's NodeAddr as Slurm has it: the address its daemons are reached at, which is what
    a cluster guarantees to route (node names need not resolve). Dry runs away from a cluster
    (required=False) fall back to the names."""
    err = ""
    try:
        res = subprocess.run(["scontrol", "show", "node", "-o", ",".join(nodes)], capture_output=True,
                             text=True, timeout=30)
        addrs = parse_node_addrs(res.stdout) if res.returncode == 0 else {}
        err = res.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        addrs, err = {}, str(exc)
    missing = [n for n in nodes if n not in addrs]
    if missing and required:
        raise PlanError("nodelist", f"scontrol show node gave no NodeAddr for {','.join(missing)}"
                                    + (f" ({err})" if err else ""))
    return {n: addrs.get(n, n) for n in nodes}


def job_cpus_per_node(value: str) -> int | None:
    """SLURM_JOB_CPUS_PER_NODE ("16(x2),8") -> the smallest count: every node can give that much."""
    counts = [int(m.group(1)) for m in re.finditer(r"(\d+)(?:\(x\d+\))?", value or "")]
    return min(counts) if counts else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Extra positional arguments are passed to the trainer as overrides.")
    p.add_argument("overrides", nargs="*", help="dotted trainer overrides, e.g. train.steps=10")
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN", "0") not in ("", "0"),
                   help="print the placement and commands, start nothing (also DRY_RUN=1)")
    p.add_argument("--config", default=os.environ.get("CONFIG", ""), help="trainer YAML")
    p.add_argument("--train-cmd", default=os.environ.get("TRAIN_CMD") or None,
                   help="trainer command line (default: erpo-mega train CONFIG)")
    p.add_argument("--placement", choices=PLACEMENTS, default=os.environ.get("PLACEMENT", "disaggregated"))
    p.add_argument("--rollout-nodes", type=int, default=_env_int("ROLLOUT_NODES", None),
                   help="disaggregated: nodes serving rollouts, the last ones of the allocation (default: half)")
    p.add_argument("--tasks-per-node", type=int, default=_env_int("TASKS_PER_NODE", 8),
                   help="training ranks per node: GPUs per node, or CPU ranks")
    p.add_argument("--gpus-per-node", type=int, default=_env_int("GPUS_PER_NODE", 0),
                   help="0: CPU job; else one GPU per rank and ENGINE_TP per engine server")
    p.add_argument("--tp", type=int, default=_env_int("TP", None))
    p.add_argument("--pp", type=int, default=_env_int("PP", None))
    p.add_argument("--engine", choices=ENGINES, default=os.environ.get("ENGINE", "sglang"))
    p.add_argument("--engine-tp", type=int, default=_env_int("ENGINE_TP", 1))
    p.add_argument("--engine-deterministic", action="store_true", default=_env_bool("ENGINE_DETERMINISTIC"),
                   help="SGLang --enable-deterministic-inference (it ignores sampling_seed otherwise)")
    p.add_argument("--engine-args", default=os.environ.get("ENGINE_ARGS", ""),
                   help="extra flags for every engine command")
    p.add_argument("--model-dir", default=os.environ.get("MODEL_DIR", ""))
    p.add_argument("--engine-timeout", type=float, default=_env_float("ENGINE_TIMEOUT", 1800.0),
                   help="seconds to wait for engines' /health")
    p.add_argument("--cpus-per-task", type=int, default=_env_int("CPUS_PER_TASK", None))
    p.add_argument("--run-dir", default=os.environ.get("RUN_DIR", ""),
                   help="default runs/<job name>-<job id>")
    p.add_argument("--resume", action="store_true",
                   help="pass --resume to the trainer (continue RUN_DIR's latest checkpoint); implied when "
                        "Slurm requeued the job (SLURM_RESTART_COUNT > 0)")
    return p


def check_inputs(args: argparse.Namespace) -> None:
    """Refuse, before anything starts (or a dry run says yes), inputs that cannot be read here."""
    if not args.train_cmd:
        if not args.config:
            raise PlanError("CONFIG", "no trainer config given (and no TRAIN_CMD)")
        if not Path(args.config).is_file():
            raise PlanError("CONFIG", f"no such file: {args.config} (relative paths start at {Path.cwd()})")
    if args.engine != "none" and not args.model_dir:
        raise PlanError("MODEL_DIR", f"ENGINE={args.engine} needs the HF model directory to serve")
    if args.model_dir:
        model = Path(args.model_dir)
        if not model.is_dir():
            raise PlanError("MODEL_DIR", f"no such directory: {args.model_dir}")
        if not (model / "config.json").is_file():
            raise PlanError("MODEL_DIR", f"{args.model_dir} has no config.json (not a HuggingFace model directory)")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        nodelist = os.environ.get("ERPO_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
        if not nodelist:
            raise PlanError("nodelist", "not inside a Slurm job (no SLURM_JOB_NODELIST); "
                                        "for a dry run set ERPO_NODELIST, e.g. ERPO_NODELIST='node[01-04]'")
        if not args.dry_run and os.environ.get("ERPO_NODELIST"):
            raise PlanError("ERPO_NODELIST", "only for --dry-run; a real launch uses the job's own nodes")
        check_inputs(args)
        overrides = list(args.overrides)
        if args.resume or (_env_int("SLURM_RESTART_COUNT", 0) or 0) > 0:
            overrides.append("--resume")  # the trainer's CLI takes flags among its overrides
        job_id = _env_int("SLURM_JOB_ID", 0)
        run_dir = Path(args.run_dir or f"runs/{os.environ.get('SLURM_JOB_NAME', 'erpo')}-{job_id}").resolve()
        nodes = expand_hostlist(nodelist)
        spec = LaunchSpec(
            # ERPO_PORT_SLOT: several launches inside one job (slurm/bench.sh's sweep points) each take
            # their own port block, so one point's lingering sockets never collide with the next's.
            nodes=nodes, job_id=job_id + (_env_int("ERPO_PORT_SLOT", 0) or 0), placement=args.placement,
            rollout_nodes=args.rollout_nodes, tasks_per_node=args.tasks_per_node, gpus_per_node=args.gpus_per_node,
            tp=args.tp, pp=args.pp, engine=args.engine, engine_tp=args.engine_tp,
            engine_deterministic=args.engine_deterministic, model_dir=args.model_dir, config=args.config,
            train_cmd=args.train_cmd, extra_overrides=overrides, engine_args=args.engine_args,
            node_addrs=node_addresses(nodes, required=not args.dry_run),
            api_key=API_KEY_PLACEHOLDER if args.engine != "none" else "",
            cpus_per_node=job_cpus_per_node(os.environ.get("SLURM_JOB_CPUS_PER_NODE", "")),
            cpus_per_task=args.cpus_per_task, run_dir=str(run_dir))
        plan = make_plan(spec)
        lines = describe_plan(plan)
    except PlanError as exc:
        print(f"launch: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("\n".join(lines + [f"run_dir={run_dir}"]))
        return 0
    for line in lines:
        log(f"plan {line}")
    return run(plan, run_dir, args.engine_timeout)


if __name__ == "__main__":
    sys.exit(main())
