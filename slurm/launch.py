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
import fcntl
import os
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

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, list[Path]] = {}

    def start(self, name: str, argv: list[str], logs: list[Path], capture: Path | None = None) -> None:
        """Start `argv` in its own process group; `logs` are shown on failure; `capture`, if
        given, receives its stdout/stderr (srun steps write their own files instead)."""
        log(f"start {name}: {shlex.join(argv)}")
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
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                print(f"----- last {len(tail)} lines of {path} -----", flush=True)
                print("\n".join(tail), flush=True)


def srun_step(name: str, nodes: list[str], ntasks: int, argv: list[str], output: str,
              extra: list[str] = ()) -> list[str]:
    """srun argv for one job step. --overlap: engine and training steps share the nodes' CPUs
    (colocated) instead of queueing behind each other; -K: one failing task ends the step."""
    return ["srun", f"--job-name={name}", "--overlap", "--kill-on-bad-exit=1", "--unbuffered",
            f"--nodes={len(nodes)}", f"--ntasks={ntasks}", f"--ntasks-per-node={ntasks // len(nodes)}",
            f"--nodelist={','.join(nodes)}", f"--output={output}", *extra, *argv]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(sup: Supervisor, urls: dict[str, str], timeout_s: float) -> None:
    """Poll each `name -> base URL` /health until 200; fail early if its process died."""
    pending = dict(urls)
    deadline = time.monotonic() + timeout_s
    while pending:
        for name, url in list(pending.items()):
            if sup.procs[name].poll() is not None:
                sup.print_tails(name)
                raise LaunchFailed(f"{name} exited with code {sup.procs[name].returncode} before {url}/health "
                                   f"answered")
            if http_ok(f"{url}/health"):
                log(f"{name} healthy at {url}")
                del pending[name]
        if pending and time.monotonic() > deadline:
            for name in pending:
                sup.print_tails(name)
            raise LaunchFailed(f"not healthy after {timeout_s:.0f}s: {', '.join(pending)} (ENGINE_TIMEOUT)")
        if pending:
            time.sleep(0.5)


# ----------------------------------------------------------------------------- main flow


def run(plan: Plan, run_dir: Path, engine_timeout_s: float, cpus_per_task: int | None) -> int:
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(MASTER_ADDR=plan.master_addr, MASTER_PORT=str(plan.master_port), ERPO_RUN_DIR=str(run_dir))
    env.update(socket_env(plan))
    if plan.router_url:
        env["ERPO_ROUTER_URL"] = plan.router_url
    log(f"run dir {run_dir}; MASTER_ADDR={plan.master_addr} MASTER_PORT={plan.master_port} "
        + " ".join(f"{k}={env[k]}" for k in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME") if k in env))
    sup = Supervisor(env)

    def on_signal(signum, _frame):
        raise Terminated(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if plan.engine_nodes:
            log(f"phase engines: {len(plan.engine_nodes)} x {plan.spec.engine} on {','.join(plan.engine_nodes)}")
            engine_urls = {}
            for node, url in zip(plan.engine_nodes, plan.engine_urls):
                out = log_dir / f"engine-{node}.log"
                argv = srun_step(f"engine-{node}", [node], 1, engine_command(plan), str(out))
                sup.start(f"engine@{node}", argv, [out])
                engine_urls[f"engine@{node}"] = url
            wait_healthy(sup, engine_urls, engine_timeout_s)
            log("phase router")
            router_log = log_dir / "router.log"
            sup.start("router", router_command(plan), [router_log], capture=router_log)
            wait_healthy(sup, {"router": plan.router_url}, 120.0)

        log(f"phase train: {plan.world_size} ranks on {','.join(plan.train_nodes)} (dp={plan.dp})")
        extra = [f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []
        argv = ["bash", "-c", _RANK_SHIM, "erpo-rank", *train_command(plan)]
        pattern = str(log_dir / "train-%N-rank%t.log")
        sup.start("train", srun_step("train", plan.train_nodes, plan.world_size, argv, pattern, extra),
                  [log_dir / "train-*.log"])

        while True:
            exited = sup.first_exited()
            if exited:
                break
            time.sleep(0.5)
        name, rc = exited
        if name == "train" and rc == 0:
            log("phase done: training finished")
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
    p.add_argument("--tp", type=int, default=_env_int("TP", None))
    p.add_argument("--pp", type=int, default=_env_int("PP", None))
    p.add_argument("--engine", choices=ENGINES, default=os.environ.get("ENGINE", "sglang"))
    p.add_argument("--engine-tp", type=int, default=_env_int("ENGINE_TP", 1))
    p.add_argument("--engine-args", default=os.environ.get("ENGINE_ARGS", ""),
                   help="extra flags for every engine command")
    p.add_argument("--model-dir", default=os.environ.get("MODEL_DIR", ""))
    p.add_argument("--engine-timeout", type=float, default=float(os.environ.get("ENGINE_TIMEOUT", "1800")),
                   help="seconds to wait for engines' /health")
    p.add_argument("--cpus-per-task", type=int, default=_env_int("CPUS_PER_TASK", None))
    p.add_argument("--run-dir", default=os.environ.get("RUN_DIR", ""),
                   help="default runs/<job name>-<job id>")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        nodelist = os.environ.get("ERPO_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
        if not nodelist:
            raise PlanError("nodelist", "not inside a Slurm job (no SLURM_JOB_NODELIST); "
                                        "for a dry run set ERPO_NODELIST, e.g. ERPO_NODELIST='node[01-04]'")
        if not args.dry_run and os.environ.get("ERPO_NODELIST"):
            raise PlanError("ERPO_NODELIST", "only for --dry-run; a real launch uses the job's own nodes")
        job_id = _env_int("SLURM_JOB_ID", 0)
        run_dir = Path(args.run_dir or f"runs/{os.environ.get('SLURM_JOB_NAME', 'erpo')}-{job_id}").resolve()
        if args.engine != "none" and not args.model_dir:
            raise PlanError("MODEL_DIR", f"ENGINE={args.engine} needs the HF model directory to serve")
        spec = LaunchSpec(
            nodes=expand_hostlist(nodelist), job_id=job_id, placement=args.placement,
            rollout_nodes=args.rollout_nodes, tasks_per_node=args.tasks_per_node, tp=args.tp, pp=args.pp,
            engine=args.engine, engine_tp=args.engine_tp, model_dir=args.model_dir, config=args.config,
            train_cmd=args.train_cmd, extra_overrides=args.overrides, engine_args=args.engine_args,
            run_dir=str(run_dir))
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
    return run(plan, run_dir, args.engine_timeout, args.cpus_per_task)


if __name__ == "__main__":
    sys.exit(main())
