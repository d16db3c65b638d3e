"""Process-group setup: one place that turns env vars into torch.distributed + megatron groups.

Training ranks are started by torchrun, `srun` or the test spawner; all of them export the
torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Without them
the process runs as a world of one, which is what the embedded default uses.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from erpo_mega.parallel.cpu_shim import apply_cpu_shim, default_backend


@dataclass(frozen=True)
class ParallelSizes:
    tp: int = 1
    pp: int = 1

    def dp(self, world_size: int) -> int:
        if world_size % (self.tp * self.pp):
            from erpo_mega.config import ConfigError  # a ValueError: callers catching that still do

            raise ConfigError("train.parallel", f"world size {world_size} (WORLD_SIZE: processes started) is not "
                              f"divisible by tp*pp = {self.tp}*{self.pp}")
        return world_size // (self.tp * self.pp)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (rendezvous, servers, tests)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: float = 600.0) -> ParallelSizes:
    """Initialise torch.distributed from env (or a world of one) and megatron's TP/PP/DP groups."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    apply_cpu_shim()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world > 1:
                raise RuntimeError("MASTER_PORT must be set when WORLD_SIZE > 1")
            os.environ["MASTER_PORT"] = str(free_port())
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=default_backend(), rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    sizes = ParallelSizes(tp, pp)
    sizes.dp(dist.get_world_size())  # validates divisibility with a clear message
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(seed)
    return sizes


def destroy_distributed() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
