"""Run real megatron-core on machines without CUDA (gloo, CPU tensors).

megatron-core assumes CUDA in four ways (measured on 0.16.1, see docs/PLATFORM.md):
1. `torch.cuda.current_device()` is used as a tensor device;
2. the tensor-parallel RNG tracker saves/forks/restores the CUDA generator;
3. schedules, optimizers and grad clipping allocate with a hard-coded `device="cuda"`;
4. optimizer/clip asserts check `param.type() == "torch.cuda.FloatTensor"`.

`apply_cpu_shim()` answers each of them once per process, and only when CUDA is absent:
the current device becomes the CPU, the "CUDA" generator is the CPU default generator (so
forking keeps its real semantics: dropout inside a forked region draws from the tracked
stream), and a `TorchFunctionMode` rewrites cuda devices to cpu and makes `.cuda()` a no-op.
Everything else is unchanged megatron code. On a GPU machine this module does nothing.
"""

from __future__ import annotations

import logging
import threading

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_applied = False
_mode: _CudaToCpuMode | None = None  # noqa: F821 (defined below)

_CPU = torch.device("cpu")


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev == "cuda" or dev.startswith("cuda:")
    return False


def _rewrite(value):
    return _CPU if _is_cuda_device(value) else value


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites `device=cuda` arguments to CPU and makes `.cuda()` a no-op."""

    _tensor_type = torch.Tensor.type
    _tensor_cuda = torch.Tensor.cuda

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _CudaToCpuMode._tensor_cuda:
            return args[0]
        if func is _CudaToCpuMode._tensor_type and len(args) == 1 and not kwargs:
            # megatron asserts `param.type() == 'torch.cuda.FloatTensor'`: report the CUDA name.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if "device" in kwargs:
            kwargs["device"] = _rewrite(kwargs["device"])
        if func in (torch.Tensor.to,) and args:
            args = tuple(_rewrite(a) for a in args)
        return func(*args, **kwargs)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _patch_cuda_api() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU  # used as a device argument throughout megatron
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 0
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state

    # The tracker warns when the CPU stream moved inside a fork; on CPU that stream *is* the
    # forked one, so the warning would fire for every dropout call and means nothing here.
    class _DropForkWarning(logging.Filter):
        def filter(self, record):
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger(mrandom.__name__).addFilter(_DropForkWarning())


def apply_cpu_shim(force: bool = False) -> bool:
    """Make megatron-core usable on CPU. Returns True when the shim is (now) active.

    Idempotent and process-wide. Does nothing when CUDA is available unless `force=True`
    (only for tests of the shim itself).
    """
    global _applied, _mode
    if torch.cuda.is_available() and not force:
        return False
    with _lock:
        if _applied:
            return True
        _patch_cuda_api()
        _patch_megatron_rng()
        _mode = _CudaToCpuMode()
        _mode.__enter__()  # stays active for the life of the process
        _applied = True
    return True


def shim_active() -> bool:
    return _applied


def default_device() -> torch.device:
    """The device megatron tensors live on in this process."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else _CPU


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"
