"""The rollout engines a run talks to: started here (embedded or SGLang) or given (external).

Generation goes to one URL (the router when there are several engines); weight updates go
to every engine, since a router does not fan weight updates out.

API key: every request carries `Authorization: Bearer $ERPO_ENGINE_API_KEY` when that
variable is set (the Slurm launcher sets a per-job key and starts SGLang, the router and
embedded engines with it). Engines this pool starts itself get that key, or a fresh random
one per run when none is set, so a started engine is never open to anyone who can reach
its port. Each engine's TP size (ranks in the weight-update group) is read from its server
info, for external engines too.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from erpo_mega.parallel.dist import free_port
from erpo_mega.rollout.client import SGLangClient
from erpo_mega.rollout.launch import ServerHandle, launch_embedded_server, launch_router, launch_sglang_server
from erpo_mega.run_config import RolloutSection
from erpo_mega.weights.transport import DistributedWeightSender, PushReport, push_weights

log = logging.getLogger(__name__)

API_KEY_ENV = "ERPO_ENGINE_API_KEY"


class EnginePool:
    def __init__(self, cfg: RolloutSection, run_dir: Path, seed: int):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.seed = seed
        self.handles: list[ServerHandle] = []
        self.router: ServerHandle | None = None
        self.engines: list[SGLangClient] = []
        self.generate_client: SGLangClient | None = None
        self._sender: DistributedWeightSender | None = None
        self.api_key: str | None = os.environ.get(API_KEY_ENV) or None

    def _port(self, i: int) -> int:
        return self.cfg.base_port + i if self.cfg.base_port else free_port()

    def _client(self, url: str) -> SGLangClient:
        return SGLangClient(url, timeout=self.cfg.request_timeout_s, max_concurrency=self.cfg.max_concurrency,
                            api_key=self.api_key)

    def start(self, model_dir: Path) -> EnginePool:
        """Start (or connect to) the engines; `model_dir` is an HF dir of the current weights."""
        cfg = self.cfg
        logs = self.run_dir / "engines"
        logs.mkdir(parents=True, exist_ok=True)
        try:
            if cfg.engine == "external":
                urls = list(cfg.engine_urls)
            else:
                self.api_key = self.api_key or secrets.token_urlsafe(24)
                for i in range(cfg.num_engines):
                    port = self._port(i)
                    if cfg.engine == "embedded":
                        h = launch_embedded_server(model_dir, cfg.host, port, log_path=logs / f"engine{i}.log",
                                                   random_seed=self.seed, timeout=300.0, api_key=self.api_key)
                    else:
                        h = launch_sglang_server(model_dir, cfg.host, port, tp=cfg.engine_tp,
                                                 log_path=logs / f"engine{i}.log", timeout=1800.0,
                                                 api_key=self.api_key)
                    self.handles.append(h)
                urls = [h.url for h in self.handles]
            self.engines = [self._client(u) for u in urls]
            for e in self.engines:
                e.wait_healthy(timeout=300.0)
            gen_url = cfg.router_url
            if gen_url is None and len(urls) > 1 and cfg.engine != "external":
                self.router = launch_router(urls, self._port(cfg.num_engines), cfg.host,
                                            log_path=logs / "router.log", api_key=self.api_key)
                gen_url = self.router.url
            self.generate_client = self._client(gen_url or urls[0])
        except BaseException:
            self.close()
            raise
        return self

    def sync(self, named_tensors, weight_version: str) -> PushReport:
        """Push the trainer's weights to every engine (called on the exporting rank only)."""
        method = self.cfg.sync_method
        bucket = int(self.cfg.bucket_mb * 2**20)
        if method == "distributed" and self._sender is None:
            # The engines dial this address: on a cluster it must be routable from rollout nodes.
            addr = os.environ.get("ERPO_WEIGHT_SYNC_ADDR") or os.environ.get("MASTER_ADDR") or "127.0.0.1"
            # group sizes from each engine's tp_size; NCCL when this rank has a GPU, else gloo
            self._sender = DistributedWeightSender(self.engines, addr, free_port()).connect()
        return push_weights(named_tensors, self.engines, method=method, bucket_bytes=bucket,
                            weight_version=weight_version, disk_dir=self.run_dir / "engine_weights",
                            sender=self._sender)

    def close(self) -> None:
        if self._sender is not None:
            try:
                self._sender.close()
            except Exception as e:  # engines may already be gone at shutdown
                log.warning("closing the weight-update group failed: %s", e)
            self._sender = None
        for c in self.engines:
            c.close()
        if self.generate_client is not None:
            self.generate_client.close()
        if self.router is not None:
            self.router.close()
            self.router = None
        for h in self.handles:
            h.close()
        self.handles = []
