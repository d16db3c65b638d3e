"""How tensors travel to an engine: ForkingPickler payloads, flattened buckets, weight groups.

Shared by the sender (`erpo_mega.weights.transport`) and the receiver (the embedded engine),
so both sides agree on one layout by construction, and both agree with SGLang 0.5.23 (its own
code checks our bytes in tests/rollout/test_sglang_wire.py).

- `serialize_named_tensors` / `serialize_per_rank`: SGLang's `serialized_named_tensors`
  entries: base64 of `ForkingPickler` output, **one entry per engine TP rank** (SGLang's
  scheduler reads `serialized_named_tensors[tp_rank]`, and each rank must open its own copy
  of a CUDA IPC handle). These carry *handles*: CUDA IPC handles on GPU (device named by its
  UUID, as SGLang's patched torch reductions expect, see `cuda_ipc_pickler`); for CPU tensors
  the `file_system` sharing strategy (a named shared-memory file). The sender must keep the
  tensors alive until the engine answers the HTTP request.
- `safe_loads` / `deserialize_named_tensors`: the receiver's unpickler is an allowlist (plain
  tensors, storages, dtypes, sizes, builtin containers, `types.SimpleNamespace`, SGLang's own
  bucket metadata class); any other global raises `UnsafePayloadError` *before* anything is
  called, so a crafted payload cannot run code.
- flattened buckets: many tensors in one uint8 buffer, packed contiguously in `names` order
  exactly as SGLang's `FlattenedTensorBucket` computes it (no padding). A tensor whose byte
  offset is not a multiple of its element size cannot be viewed in place, and SGLang refuses
  it; `align_order` orders a bucket by decreasing element size, which makes every offset
  aligned. The metadata pickles as `types.SimpleNamespace` (in SGLang's unpickling allowlist,
  and read by attribute exactly like SGLang's own metadata class).
- `init_weight_group`: a process group just for weight broadcast, built the way
  `torch.distributed.init_process_group` builds one (TCPStore at the trainer, then
  PrefixStore(group_name) / PrefixStore(group_name + "/") / PrefixStore(device + "/")) but
  without touching the default group, so it coexists with Megatron's groups.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import io
import pickle
import types
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing import reductions as _reductions

_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
}


class UnsafePayloadError(ValueError):
    """A serialized payload names a global outside the allowlist; nothing of it was run."""


def dtype_from_name(name: str) -> torch.dtype:
    """'bfloat16' or 'torch.bfloat16' -> torch.bfloat16 (SGLang sends the short name)."""
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r} (supported: {sorted(_DTYPES)})")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- ForkingPickler payloads -----------------------------------------------------------------
def _cuda_device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _cuda_index_from_uuid(device) -> int:
    """SGLang's receiving side: an int is an index, a str a GPU UUID looked up locally."""
    if isinstance(device, int):
        return device
    if isinstance(device, str):
        for i in range(torch.cuda.device_count()):
            if _cuda_device_uuid(i) == device:
                return i
        raise UnsafePayloadError(f"CUDA IPC handle names GPU {device!r}, which this process cannot see")
    raise UnsafePayloadError(f"CUDA IPC handle has a device of type {type(device).__name__}")


# Position of the device index among `rebuild_cuda_tensor`'s arguments (torch's reduce_tensor).
_CUDA_DEVICE_ARG = 6


class _UUIDForkingPickler(ForkingPickler):
    """ForkingPickler whose CUDA tensors name their GPU by UUID instead of index.

    SGLang's engine patches torch's reductions (its `monkey_patch_torch_reductions`) so that
    a CUDA IPC handle names its device by UUID: the trainer and the engine see the same GPU
    under different indices (CUDA_VISIBLE_DEVICES differs). This pickler produces exactly
    that wire format (the rebuild function stays torch's allowlisted `rebuild_cuda_tensor`,
    which the patched receiver resolves to its UUID-aware version) without patching torch
    globally in the trainer.
    """

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            fn, args = _reductions.reduce_tensor(obj)
            if fn is _reductions.rebuild_cuda_tensor and isinstance(args[_CUDA_DEVICE_ARG], int):
                args = (*args[:_CUDA_DEVICE_ARG], _cuda_device_uuid(args[_CUDA_DEVICE_ARG]),
                        *args[_CUDA_DEVICE_ARG + 1:])
            return fn, args
        return NotImplemented


def _rebuild_cuda_tensor_by_uuid(*args):
    """Receiver side of the UUID wire format (what SGLang's patched rebuild does)."""
    args = (*args[:_CUDA_DEVICE_ARG], _cuda_index_from_uuid(args[_CUDA_DEVICE_ARG]),
            *args[_CUDA_DEVICE_ARG + 1:])
    return _reductions.rebuild_cuda_tensor(*args)


def serialize_named_tensors(obj) -> str:
    """base64(ForkingPickler(obj)); CPU tensors move to shared memory (file_system), CUDA
    tensors travel as IPC handles naming their GPU by UUID."""
    mp.set_sharing_strategy("file_system")
    buf = io.BytesIO()
    _UUIDForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def serialize_per_rank(obj, tp_size: int) -> list[str]:
    """One independently pickled payload per engine TP rank (index = the rank's tp_rank)."""
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    return [serialize_named_tensors(obj) for _ in range(tp_size)]


def _allowed_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {}
    for name in ("bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset", "int", "list",
                 "range", "set", "slice", "str", "tuple"):
        allowed[("builtins", name)] = getattr(__import__("builtins"), name)
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    allowed[("types", "SimpleNamespace")] = types.SimpleNamespace
    allowed[("copyreg", "__newobj__")] = __import__("copyreg").__newobj__
    for name in dir(torch):
        obj = getattr(torch, name, None)
        if isinstance(obj, torch.dtype):
            allowed[("torch", name)] = obj
    allowed.update({
        ("torch", "Size"): torch.Size, ("torch", "device"): torch.device, ("torch", "Tensor"): torch.Tensor,
        ("torch", "dtype"): torch.dtype, ("torch", "UntypedStorage"): torch.UntypedStorage,
        ("torch.storage", "UntypedStorage"): torch.storage.UntypedStorage,
        ("torch.storage", "TypedStorage"): torch.storage.TypedStorage,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch.multiprocessing.reductions", "rebuild_tensor"): _reductions.rebuild_tensor,
        ("torch.multiprocessing.reductions", "rebuild_typed_storage"): _reductions.rebuild_typed_storage,
        ("torch.multiprocessing.reductions", "rebuild_storage_filename"): _reductions.rebuild_storage_filename,
        ("torch.multiprocessing.reductions", "rebuild_storage_empty"): _reductions.rebuild_storage_empty,
        # CUDA IPC: torch's own and SGLang's patched rebuild both accept a GPU UUID here
        ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"): _rebuild_cuda_tensor_by_uuid,
        ("sglang.srt.utils.patch_torch", "_rebuild_cuda_tensor_modified"): _rebuild_cuda_tensor_by_uuid,
        # a sender using SGLang's own FlattenedTensorBucket: same fields, read by attribute
        ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata"): FlattenedTensorMetadata,
    })
    return allowed


class _AllowlistUnpickler(pickle.Unpickler):
    """Resolves only allowlisted globals; everything else raises before it could be called."""

    _allowed: dict | None = None

    def find_class(self, module, name):
        if _AllowlistUnpickler._allowed is None:
            _AllowlistUnpickler._allowed = _allowed_globals()
        obj = self._allowed.get((module, name))
        if obj is None:
            raise UnsafePayloadError(f"payload refused: global {module}.{name} is not allowed in a tensor payload")
        return obj

    def persistent_load(self, pid):
        raise UnsafePayloadError("payload refused: persistent ids are not allowed in a tensor payload")


def safe_loads(raw: bytes):
    """Unpickle with the allowlist; `UnsafePayloadError` for anything else or malformed data."""
    try:
        return _AllowlistUnpickler(io.BytesIO(raw)).load()
    except UnsafePayloadError:
        raise
    except (pickle.UnpicklingError, EOFError, IndexError, KeyError, AttributeError, TypeError) as e:
        raise UnsafePayloadError(f"payload refused: not a valid tensor pickle ({type(e).__name__}: {e})") from None


def deserialize_named_tensors(payload: str | bytes):
    """Inverse of `serialize_named_tensors` (allowlisted); opens the sender's shared-memory handles."""
    if isinstance(payload, str):
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise UnsafePayloadError(f"payload refused: invalid base64 ({e})") from None
    else:
        raw = bytes(payload)
    return safe_loads(raw)


# --- flattened buckets -----------------------------------------------------------------------
@dataclass
class FlattenedTensorMetadata:
    """Where one tensor lives in a uint8 bucket: bytes [start_idx, end_idx).

    Field names and meanings are SGLang's (`numel` is the byte count, as SGLang computes it).
    Pickles as `types.SimpleNamespace` so SGLang's allowlist accepts it.
    """

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int

    def __reduce__(self):
        return (types.SimpleNamespace, (), dict(name=self.name, shape=torch.Size(self.shape), dtype=self.dtype,
                                                start_idx=self.start_idx, end_idx=self.end_idx, numel=self.numel))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def align_order(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Stable order by decreasing element size: packed contiguously, every offset is aligned."""
    return sorted(named_tensors, key=lambda nt: -nt[1].element_size())


def bucket_layout(names: Sequence[str], dtypes: Sequence[torch.dtype],
                  shapes: Sequence[Sequence[int]]) -> tuple[list[FlattenedTensorMetadata], int]:
    """SGLang's layout: contiguous in `names` order, no padding; an unaligned offset is refused."""
    if not (len(names) == len(dtypes) == len(shapes)):
        raise ValueError(f"names/dtypes/shapes lengths differ: {len(names)}/{len(dtypes)}/{len(shapes)}")
    metas, offset = [], 0
    for name, dtype, shape in zip(names, dtypes, shapes):
        dtype = dtype if isinstance(dtype, torch.dtype) else dtype_from_name(dtype)
        shape = torch.Size([int(s) for s in shape])
        if any(s < 0 for s in shape):
            raise ValueError(f"negative dimension in tensor {name!r}: {tuple(shape)}")
        itemsize = _itemsize(dtype)
        if offset % itemsize:
            raise ValueError(f"unaligned tensor {name!r} in flattened bucket: byte offset {offset} is not a "
                             f"multiple of {itemsize} ({dtype}); order the bucket with align_order()")
        size = shape.numel() * itemsize
        metas.append(FlattenedTensorMetadata(name, shape, dtype, offset, offset + size, size))
        offset += size
    return metas, offset


def flatten_bucket(named_tensors: Sequence[tuple[str, torch.Tensor]],
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[FlattenedTensorMetadata]]:
    """Pack tensors into one uint8 buffer (optionally a preallocated `out`), in the given order."""
    metas, total = bucket_layout([n for n, _ in named_tensors], [t.dtype for _, t in named_tensors],
                                 [t.shape for _, t in named_tensors])
    device = named_tensors[0][1].device if named_tensors else "cpu"
    flat = torch.empty(total, dtype=torch.uint8, device=device) if out is None else out[:total]
    for meta, (_, t) in zip(metas, named_tensors):
        flat[meta.start_idx:meta.end_idx].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    return flat, metas


def unflatten_bucket(flat: torch.Tensor, metas: Sequence) -> list[tuple[str, torch.Tensor]]:
    """Views into `flat` (no copy), one per metadata entry (any object with SGLang's fields)."""
    if not isinstance(flat, torch.Tensor) or flat.dtype != torch.uint8 or flat.dim() != 1:
        raise ValueError("flattened_tensor must be a 1-D uint8 tensor")
    out = []
    for m in metas:
        dtype, shape = m.dtype, torch.Size(m.shape)
        if not isinstance(dtype, torch.dtype) or not isinstance(m.name, str):
            raise ValueError(f"bucket metadata entry {m!r} is malformed")
        size = shape.numel() * _itemsize(dtype)
        if not 0 <= m.start_idx <= m.end_idx <= flat.numel() or m.end_idx - m.start_idx != size:
            raise ValueError(f"bucket entry {m.name!r}: bytes [{m.start_idx}, {m.end_idx}) do not hold "
                             f"{tuple(shape)} {dtype} inside a {flat.numel()}-byte bucket")
        if m.start_idx % _itemsize(dtype):
            raise ValueError(f"bucket entry {m.name!r}: unaligned byte offset {m.start_idx} for {dtype}")
        out.append((m.name, flat[m.start_idx:m.end_idx].view(dtype).reshape(shape)))
    return out


# --- weight-update process group -------------------------------------------------------------
@dataclass
class WeightGroup:
    """A broadcast-only process group plus the TCPStore it needs alive (rank 0 hosts it)."""

    pg: dist.ProcessGroup
    store: dist.TCPStore
    backend: str
    rank: int
    world_size: int

    def broadcast_async(self, tensor: torch.Tensor, src: int = 0):
        """Start a broadcast; the returned Work has `is_completed()` and `wait()`."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        return self.pg.broadcast([tensor], opts)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        self.broadcast_async(tensor, src).wait()


def init_weight_group(master_address: str, master_port: int, rank: int, world_size: int,
                      group_name: str, backend: str, timeout_s: float = 300.0) -> WeightGroup:
    """Join (rank > 0) or host (rank 0) a broadcast group.

    gloo connects all ranks here (the call blocks until everyone joined); NCCL connects on the
    first collective. No extra handshake collective is sent, to stay wire-compatible with SGLang.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, int(master_port), world_size, is_master=(rank == 0),
                          timeout=timeout, wait_for_workers=False)
    device = "cuda" if backend == "nccl" else "cpu"
    prefixed = dist.PrefixStore(f"{device}/", dist.PrefixStore(f"{group_name}/",
                                                               dist.PrefixStore(group_name, store)))
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    else:
        pg = dist.ProcessGroupNCCL(prefixed, rank, world_size)
    return WeightGroup(pg, store, backend, rank, world_size)
