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
                                                   random_seed=self.seed, timeout=300.0, api_key=self.api_key,
                                                   enable_memory_saver=cfg.colocate)
                    else:
                        h = launch_sglang_server(model_dir, cfg.host, port, tp=cfg.engine_tp,
                                                 log_path=logs / f"engine{i}.log", timeout=1800.0,
                                                 api_key=self.api_key, enable_memory_saver=cfg.colocate)
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

    def describe_failure(self, error: Exception) -> str:
        """One sentence for an engine call that failed: which engine, and whether (and how) the
        process this pool launched for it has exited, with its log file."""
        parts = [str(error)]
        for i, h in enumerate(self.handles):
            code = h.process.poll()
            if code is None:
                continue
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            name = "router" if h is self.router else f"engine {i}"
            parts.append(f"{name} ({h.url}, pid {h.process.pid}) {how}; log: {h.log_path or '(none)'}")
        if self.router is not None and self.router.process.poll() is not None and self.router not in self.handles:
            code = self.router.process.returncode
            parts.append(f"router ({self.router.url}) exited ({code}); log: {self.router.log_path or '(none)'}")
        return "; ".join(parts)

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


def local_sync_address() -> str:
    """The address engines dial to reach this rank's weight-update group: ERPO_WEIGHT_SYNC_ADDR
    (a launcher sets it per node) or, on one machine, loopback; else this host's address."""
    import socket

    addr = os.environ.get("ERPO_WEIGHT_SYNC_ADDR")
    if addr:
        return addr
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if master in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    return socket.gethostbyname(socket.gethostname())


class StagedWeightSync:
    """Distributed weight sync where each pipeline stage sends its own layers.

    Runs on the *stage leaders* (tp=0, dp=0 of every pipeline stage, i.e. the members of the
    dp=0/tp=0 pipeline group, `group`). Each leader hosts its own weight-update group
    (`<prefix>_pp<stage>`, trainer rank 0 + every engine's TP ranks) and broadcasts the
    tensors its stage owns (`iter_hf_weights(..., yield_on="stage")`), so no layer crosses
    the pipeline first and the stages send in parallel. Stage 0's leader holds the engine
    clients and coordinates: it pauses generation and opens the engines' sessions before any
    stage sends, and after every stage reports success it closes them, sets the weight
    version once and flushes the cache once. A failure on any stage fails the sync on all of
    them (an all-reduce of a success flag), never a hang.
    """

    def __init__(self, group, stage: int, engines: list[SGLangClient] | None = None, *,
                 address: str | None = None, group_prefix: str = "weight_update_group",
                 backend: str | None = None, timeout_s: float = 300.0, request_timeout_s: float = 300.0):
        import torch.distributed as dist

        self.group, self.stage = group, stage
        self.num_stages = dist.get_world_size(group)
        self.engines = list(engines or [])
        self.address = address or local_sync_address()
        self.group_name = f"{group_prefix}_pp{stage}"
        self.backend, self.timeout_s, self.request_timeout_s = backend, timeout_s, request_timeout_s
        self.sender: DistributedWeightSender | None = None
        if stage == 0 and not self.engines:
            raise ValueError("StagedWeightSync: stage 0 coordinates and needs the engine clients")

    def _flag(self, ok: bool) -> bool:
        """True when every stage leader says ok (all-reduce MIN over the leaders' group)."""
        import torch
        import torch.distributed as dist

        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def connect(self) -> StagedWeightSync:
        """Stage 0 tells the other leaders the engines (urls, api key, tp sizes); every leader
        then opens its own group with every engine (collective over the leaders)."""
        import torch.distributed as dist

        info = [None]
        if self.stage == 0:
            info = [[(e.base_url, e.api_key, e.engine_tp_size(), e.timeout) for e in self.engines]]
        dist.broadcast_object_list(info, src=dist.get_global_rank(self.group, 0), group=self.group)
        if self.stage != 0:
            self.engines = [SGLangClient(url, timeout=t, api_key=key) for url, key, _, t in info[0]]
        tp_sizes = [tp for _, _, tp, _ in info[0]]
        self.sender = DistributedWeightSender(self.engines, self.address, free_port(self.address),
                                              backend=self.backend, group_name=self.group_name,
                                              engine_tp_sizes=tp_sizes, timeout_s=self.timeout_s).connect()
        return self

    def sync(self, named_tensors, weight_version: str | None, bucket_bytes: int, flattened: bool = True,
             pause_mode: str | None = "abort") -> PushReport:
        """Every leader calls this with its stage's tensors; returns this stage's report."""
        from erpo_mega.rollout.client import WeightUpdateError
        from erpo_mega.weights.transport import PushSession

        if self.sender is None:
            raise RuntimeError("StagedWeightSync.sync before connect()")
        session, err, report = None, None, None
        if self.stage == 0:
            session = PushSession(self.engines, weight_version, pause_mode)
            try:
                session.__enter__()
            except BaseException as e:
                session, err = None, e
        if self._flag(err is None):
            try:
                report = self.sender.push(named_tensors, bucket_bytes=bucket_bytes, flattened=flattened,
                                          manage_session=False)
            except BaseException as e:
                err = e
        for _ in named_tensors:  # the export is a collective: always run it to the end
            pass
        all_ok = self._flag(err is None)
        if session is not None:
            if all_ok:
                session.__exit__(None, None, None)
            else:
                session.__exit__(WeightUpdateError, None, None)
        if err is not None:
            raise err
        if not all_ok:
            raise WeightUpdateError(self.address, "another pipeline stage's weight push failed")
        return report

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None


class PipelineStageSync:
    """The trainer's side of per-stage sync (`rollout.sync_method: distributed` with PP > 1).

    Called on every training rank, in lockstep: the stage leaders (tp=0, dp=0) each push their
    stage's layers through one `StagedWeightSync` (created on first use, kept for the run);
    the other ranks take part in the export's TP collectives. Global rank 0 (stage 0's
    leader) holds the `EnginePool`; its report covers stage 0's share of the bytes.
    """

    def __init__(self, cfg: RolloutSection):
        self.cfg = cfg
        self._sync: StagedWeightSync | None = None

    def sync(self, model_chunks, model_cfg, pool: EnginePool | None, version: str) -> PushReport | None:
        from megatron.core import parallel_state as ps

        from erpo_mega.weights.export import iter_hf_weights

        named = iter_hf_weights(model_chunks, model_cfg, yield_on="stage")
        leader = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        if not leader:
            for _ in named:
                pass
            return None
        if self._sync is None:
            stage = ps.get_pipeline_model_parallel_rank()
            engines = pool.engines if stage == 0 and pool is not None else None
            self._sync = StagedWeightSync(ps.get_pipeline_model_parallel_group(), stage, engines,
                                          request_timeout_s=self.cfg.request_timeout_s).connect()
        return self._sync.sync(named, version, int(self.cfg.bucket_mb * 2**20))

    def close(self) -> None:
        if self._sync is not None:
            try:
                self._sync.close()
            except Exception as e:  # engines may already be gone at shutdown
                log.warning("closing the per-stage weight-update group failed: %s", e)
            self._sync = None
