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


# A CPU (gloo) group over every rank, for waiting while rank 0 alone works (rollout, rewards,
# eval, disk syncs). Those phases can take far longer than a collective on the default
# (NCCL) group may block before its watchdog kills the job, and a waiting NCCL collective
# also spins a GPU stream; a gloo wait with its own, longer timeout does neither.
_WAIT_GROUP = None
DEFAULT_RANK0_WAIT_S = 6 * 3600.0


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: float = 600.0,
                     rank0_wait_s: float = DEFAULT_RANK0_WAIT_S) -> ParallelSizes:
    """Initialise torch.distributed from env (or a world of one) and megatron's TP/PP/DP groups.

    `timeout_s` bounds collectives of the training math; `rank0_wait_s` bounds how long the
    other ranks wait (on a gloo group) for a rank-0-only phase: size it to the longest
    rollout + eval (see `wait_for_rank0`)."""
    global _WAIT_GROUP
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
            # Under Slurm's per-task GPU binding (slurm/launch.py) a rank sees only its own GPU.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend=default_backend(), rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    sizes = ParallelSizes(tp, pp)
    sizes.dp(dist.get_world_size())  # validates divisibility with a clear message
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(seed)
    _WAIT_GROUP = None
    if dist.get_world_size() > 1:
        _WAIT_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=rank0_wait_s))
    return sizes


def wait_group():
    """The gloo group rank-0-only phases are waited on (None in a world of one)."""
    return _WAIT_GROUP


def wait_for_rank0() -> None:
    """Barrier on the wait group: the other ranks block here, on CPU, while rank 0 works."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=_WAIT_GROUP)


def broadcast_from_rank0(obj):
    """Rank 0's picklable object on every rank, waited for on the wait group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_WAIT_GROUP)
    return box[0]


def destroy_distributed() -> None:
    from megatron.core import parallel_state as ps

    global _WAIT_GROUP
    _WAIT_GROUP = None
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
