"""Start rollout servers as subprocesses: the embedded engine, real SGLang, or sglang-router.

Each launcher returns a `ServerHandle` that waits for `/health`, exposes a ready
`SGLangClient`, and stops its process (SIGTERM, then SIGKILL) on `close()` or `with` exit.

`api_key`: the server requires `Authorization: Bearer <key>` (SGLang's `--api-key`; for the
embedded engine it travels in the environment, ERPO_ENGINE_API_KEY, not on the command line);
the handle's `client()` sends it. SGLang's command uses `--tp-size` (not an abbreviation) and
dp 1 (SGLang refuses weight updates otherwise); `deterministic=True` adds
`--enable-deterministic-inference`, without which SGLang ignores `sampling_seed`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from erpo_mega.parallel.dist import free_port
from erpo_mega.parallel.lifeline import popen_kwargs
from erpo_mega.rollout.client import EngineError, SGLangClient


@dataclass
class ServerHandle:
    url: str
    process: subprocess.Popen
    command: list[str]
    log_path: Path | None = None
    _log_file: object = field(default=None, repr=False)
    api_key: str | None = field(default=None, repr=False)

    def client(self, **kw) -> SGLangClient:
        kw.setdefault("api_key", self.api_key)
        return SGLangClient(self.url, **kw)

    def wait_healthy(self, timeout: float = 120.0) -> ServerHandle:
        c = SGLangClient(self.url, max_retries=0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EngineError(self.url, f"server exited with code {self.process.returncode} before "
                                  f"becoming healthy; command: {' '.join(self.command)}; "
                                  f"log: {self._tail()}")
            if c.health(timeout=10.0):  # SGLang's /health runs a one-token generation (>= 1 s)
                return self
            time.sleep(0.1)
        self.close()
        raise EngineError(self.url, f"not healthy after {timeout:.0f}s; log: {self._tail()}")

    def _tail(self, n: int = 2000) -> str:
        if self.log_path and self.log_path.is_file():
            return self.log_path.read_text(errors="replace")[-n:]
        return "(no log file)"

    def close(self, grace_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _spawn(cmd: list[str], url: str, log_path: str | Path | None, env: dict | None,
           api_key: str | None = None) -> ServerHandle:
    log_file = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 (owned by handle)
    # the server dies with this process, even on kill -9 (parallel/lifeline.py)
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                            **popen_kwargs({**os.environ, **(env or {})}))
    return ServerHandle(url, proc, cmd, Path(log_path) if log_path else None,
                        log_file if log_path else None, api_key)


def embedded_server_command(model_path: str | Path, host: str = "127.0.0.1", port: int = 30000,
                            dtype: str = "auto", enable_memory_saver: bool = False, random_seed: int = 0,
                            num_threads: int | None = None, log_level: str = "warning",
                            tokenizer_path: str | Path | None = None, extra_args: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "erpo_mega.rollout.serve", "--model-path", str(model_path),
           "--host", host, "--port", str(port), "--dtype", dtype, "--random-seed", str(random_seed),
           "--log-level", log_level]
    if enable_memory_saver:
        cmd.append("--enable-memory-saver")
    if num_threads:
        cmd += ["--num-threads", str(num_threads)]
    if tokenizer_path:
        cmd += ["--tokenizer-path", str(tokenizer_path)]
    return cmd + list(extra_args)


def launch_embedded_server(model_path: str | Path, host: str = "127.0.0.1", port: int = 30000, *,
                           wait: bool = True, timeout: float = 120.0, log_path: str | Path | None = None,
                           env: dict | None = None, api_key: str | None = None, **kw) -> ServerHandle:
    """`python -m erpo_mega.rollout.serve ...` in a subprocess; waits for /health by default."""
    cmd = embedded_server_command(model_path, host, port, **kw)
    env = {**(env or {}), **({"ERPO_ENGINE_API_KEY": api_key} if api_key else {})}
    handle = _spawn(cmd, f"http://{host}:{port}", log_path, env, api_key)
    return handle.wait_healthy(timeout) if wait else handle


def sglang_server_command(model_path: str | Path, host: str = "127.0.0.1", port: int = 30000, tp: int = 1,
                          enable_memory_saver: bool = False, dtype: str | None = None,
                          mem_fraction_static: float | None = None, random_seed: int | None = None,
                          skip_tokenizer_init: bool = False, log_level: str | None = None,
                          api_key: str | None = None, deterministic: bool = False,
                          extra_args: Sequence[str] = ()) -> list[str]:
    """The real `python -m sglang.launch_server` command line for GPU nodes (checked with
    SGLang's own parser in tests/rollout/test_sglang_wire.py)."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path), "--tp-size", str(tp),
           "--host", host, "--port", str(port)]
    if api_key:
        cmd += ["--api-key", api_key]
    if deterministic:
        cmd.append("--enable-deterministic-inference")
    if enable_memory_saver:
        cmd.append("--enable-memory-saver")
    if dtype:
        cmd += ["--dtype", dtype]
    if mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(mem_fraction_static)]
    if random_seed is not None:
        cmd += ["--random-seed", str(random_seed)]
    if skip_tokenizer_init:
        cmd.append("--skip-tokenizer-init")
    if log_level:
        cmd += ["--log-level", log_level]
    return cmd + list(extra_args)


def launch_sglang_server(model_path: str | Path, host: str = "127.0.0.1", port: int = 30000, *,
                         wait: bool = True, timeout: float = 600.0, log_path: str | Path | None = None,
                         env: dict | None = None, **kw) -> ServerHandle:
    try:
        import sglang  # noqa: F401
    except ImportError:
        raise RuntimeError("sglang is not installed (pip install 'erpo-mega[sglang]' on a GPU node); "
                           "use launch_embedded_server on CPU") from None
    cmd = sglang_server_command(model_path, host, port, **kw)
    handle = _spawn(cmd, f"http://{host}:{port}", log_path, env, kw.get("api_key"))
    return handle.wait_healthy(timeout) if wait else handle


# A GRPO group is G requests with one prompt: `cache_aware` sends requests sharing a prefix to
# the worker that already holds it, so the group's prompt is prefilled once on one worker
# (round_robin spreads the group over every worker, each computing the same prefix again).
ROUTER_POLICY = "cache_aware"


def router_command(worker_urls: Sequence[str], port: int, host: str = "127.0.0.1",
                   policy: str = ROUTER_POLICY, extra_args: Sequence[str] = (),
                   api_key: str | None = None) -> list[str]:
    key = ["--api-key", api_key] if api_key else []
    return [sys.executable, "-m", "sglang_router.launch_router", "--host", host, "--port", str(port),
            "--worker-urls", *worker_urls, "--policy", policy, *key, *extra_args]


def launch_router(worker_urls: Sequence[str], port: int, host: str = "127.0.0.1", *,
                  policy: str = ROUTER_POLICY, wait: bool = True, timeout: float = 60.0,
                  log_path: str | Path | None = None, prometheus_port: int | None = None,
                  extra_args: Sequence[str] = (), api_key: str | None = None) -> ServerHandle:
    """sglang-router in front of running workers (their /health must already answer).

    The router also serves Prometheus metrics, on port 29000 unless told otherwise; a free
    port is chosen here so two routers (or a stale one) on a host do not collide. With
    `wait`, returns once the router answers /health *and* lists every worker as healthy: it
    registers workers asynchronously, and until then it sends everything to those it has.
    """
    metrics = ["--prometheus-host", host, "--prometheus-port", str(prometheus_port or free_port(host))]
    cmd = router_command(worker_urls, port, host, policy, [*metrics, *extra_args], api_key=api_key)
    handle = _spawn(cmd, f"http://{host}:{port}", log_path, None, api_key)
    if not wait:
        return handle
    deadline = time.monotonic() + timeout
    handle.wait_healthy(timeout)
    _wait_workers_registered(handle, len(set(worker_urls)), deadline)
    return handle


def _wait_workers_registered(handle: ServerHandle, n: int, deadline: float) -> None:
    client = handle.client(max_retries=0)
    seen = None
    while time.monotonic() < deadline:
        try:
            info = client.request("GET", "/workers", timeout=10.0)
        except EngineError as e:
            if e.status == 404:  # a router without the listing endpoint: nothing to wait on
                return
            info = None
        if isinstance(info, dict):
            seen = [w for w in info.get("workers", []) if w.get("is_healthy", True)]
            if len(seen) >= n:
                return
        time.sleep(0.2)
    handle.close()
    raise EngineError(handle.url, f"router lists {0 if seen is None else len(seen)} of {n} workers as healthy "
                      f"after the wait; log: {handle._tail()}")
