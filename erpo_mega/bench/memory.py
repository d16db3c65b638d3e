"""Peak memory of this process: CUDA allocator high-water mark on GPU, RSS high-water on CPU."""

from __future__ import annotations

import os
import resource
import socket
import sys


def peak_rss_bytes() -> int:
    """The process's maximum resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def current_rss_bytes() -> int:
    """Resident set size now (the baseline before the model is built: libraries, interpreter)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return peak_rss_bytes()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def rank_memory(rank: int, rss_baseline: int | None = None) -> dict:
    """One rank's peaks; `cuda_max_allocated_bytes` is None on CPU. `rss_baseline_bytes` is the
    RSS before the model was built, so peak - baseline is what the model, optimizer and
    activations took on CPU."""
    import torch

    out = {"rank": rank, "host": os.environ.get("SLURMD_NODENAME") or socket.gethostname(), "pid": os.getpid(), "rss_peak_bytes": peak_rss_bytes(),
           "rss_baseline_bytes": rss_baseline,
           "cuda_max_allocated_bytes": None, "cuda_max_reserved_bytes": None}
    if torch.cuda.is_available():
        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        out["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    return out
