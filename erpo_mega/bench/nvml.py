"""Background GPU sampler on nvidia-ml-py: utilisation, memory and power per GPU.

One sampler per node (the rank with LOCAL_RANK 0) polls every GPU it can see every
`interval_s` from a daemon thread, so the step being measured is never blocked by NVML.
`summary()` gives mean and max per GPU; `None` where there is no NVIDIA driver (CPU runs).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable


def _nvml():
    """The pynvml module, initialised, or None when there is no NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no library, no driver, no device: all mean "no NVIDIA GPU here"
        return None


def _read_all(nv) -> list[dict]:
    out = []
    for i in range(nv.nvmlDeviceGetCount()):
        hnd = nv.nvmlDeviceGetHandleByIndex(i)
        util = nv.nvmlDeviceGetUtilizationRates(hnd)
        mem = nv.nvmlDeviceGetMemoryInfo(hnd)
        try:
            power_w = nv.nvmlDeviceGetPowerUsage(hnd) / 1000.0
        except Exception:  # some boards do not report power
            power_w = None
        out.append({"gpu": i, "util_pct": float(util.gpu), "mem_used_gib": mem.used / 2**30,
                    "mem_total_gib": mem.total / 2**30, "power_w": power_w})
    return out


class NvmlSampler:
    """`with NvmlSampler() as s: ...; s.summary()`; `read` is injectable for tests."""

    def __init__(self, interval_s: float = 1.0, read: Callable[[], list[dict]] | None = None,
                 enabled: bool = True):
        self.interval_s = interval_s
        self._nv = None
        self._read = read if enabled else None
        if read is None and enabled:
            self._nv = _nvml()
            if self._nv is not None:
                self._read = lambda: _read_all(self._nv)
        self.samples: list[list[dict]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self._read is not None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._read())
            except Exception:  # a transient NVML error loses one sample, not the run
                pass
            self._stop.wait(self.interval_s)

    def __enter__(self) -> NvmlSampler:
        if self.available:
            self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval_s + 1)
        if self._nv is not None:
            try:
                self._nv.nvmlShutdown()
            except Exception:
                pass

    def summary(self) -> dict | None:
        """{host, interval_s, samples, gpus: [{gpu, util_pct_mean/max, mem_used_gib_max, power_w_mean/max}]}."""
        if not self.available:
            return None
        per_gpu: dict[int, list[dict]] = {}
        for snap in self.samples:
            for g in snap:
                per_gpu.setdefault(g["gpu"], []).append(g)
        gpus = []
        for idx, rows in sorted(per_gpu.items()):
            util = [r["util_pct"] for r in rows]
            power = [r["power_w"] for r in rows if r["power_w"] is not None]
            gpus.append({"gpu": idx, "util_pct_mean": sum(util) / len(util), "util_pct_max": max(util),
                         "mem_used_gib_max": max(r["mem_used_gib"] for r in rows),
                         "mem_total_gib": rows[0]["mem_total_gib"],
                         "power_w_mean": sum(power) / len(power) if power else None,
                         "power_w_max": max(power) if power else None})
        return {"host": os.environ.get("SLURMD_NODENAME") or socket.gethostname(), "interval_s": self.interval_s, "samples": len(self.samples),
                "gpus": gpus, "time": time.time()}
