"""Run a function on N real processes joined by a gloo (or NCCL) group, and collect results.

Used by the multi-process tests and benchmarks: each rank gets the torchrun environment
variables, so code under test initialises exactly as it would under torchrun or srun.
Spawning costs seconds (megatron import), so callers run many checks per spawn.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp

from erpo_mega.parallel.dist import free_port


def _die_with_parent() -> None:
    """Linux: SIGKILL this rank when the spawning process dies, so no orphan ranks linger."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    _die_with_parent()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        result = fn(*args)
        payload = ("ok", result)
    except BaseException as e:  # report, then re-raise so the exit code is non-zero
        payload = ("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        path.write_bytes(pickle.dumps(payload))
        raise
    path.write_bytes(pickle.dumps(payload))


def run_distributed(fn: Callable, world_size: int, *args, timeout_s: float = 600.0) -> list:
    """Call `fn(*args)` on `world_size` fresh processes; return their results in rank order.

    `fn` must be importable (module-level). Raises RuntimeError with every failing rank's traceback.
    """
    with tempfile.TemporaryDirectory(prefix="erpo-spawn-") as out_dir:
        port = free_port()
        ctx = mp.start_processes(_worker, args=(world_size, port, fn, args, out_dir), nprocs=world_size,
                                 join=False, start_method="spawn")
        errors = []
        deadline = time.monotonic() + timeout_s
        # Poll exit codes (waitpid) rather than ctx.join's pipe sentinels: a rank that shares
        # tensors by file_system forks torch_shm_manager, which inherits the sentinel's write
        # end and keeps it open as long as any process still maps that memory.
        failed_at = None
        while True:
            codes = [p.exitcode for p in ctx.processes]
            if all(c is not None for c in codes):
                break
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = time.monotonic()  # a rank died: give the others a moment to report
            if failed_at is not None and time.monotonic() - failed_at > 10.0:
                errors.append(f"a rank exited with {[c for c in codes if c not in (None, 0)][0]}; "
                              "killed the ranks still running")
                break
            if time.monotonic() > deadline:
                errors.append(f"timed out after {timeout_s:.0f} s")
                break
            time.sleep(0.2)
        for p in ctx.processes:
            if p.exitcode is None:
                p.kill()
            p.join(timeout=5)
        results = []
        for rank in range(world_size):
            path = Path(out_dir) / f"rank{rank}.pkl"
            if not path.exists():
                errors.append(f"rank {rank}: produced no result")
                results.append(None)
                continue
            status, value = pickle.loads(path.read_bytes())
            if status == "error":
                errors.append(value)
            results.append(value)
        if errors:
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
        return results
