"""How tensors travel to an engine: ForkingPickler payloads, flattened buckets, weight groups.

Shared by the sender (`erpo_mega.weights.transport`) and the receiver (the embedded engine),
so both sides agree on one layout by construction.

- `serialize_named_tensors` / `deserialize_named_tensors`: SGLang's `serialized_named_tensors`
  entries: base64 of `torch.multiprocessing.reductions.ForkingPickler` output. These carry
  *handles*: CUDA IPC handles on GPU; for CPU tensors the `file_system` sharing strategy
  (a named shared-memory file). The sender must keep the tensors alive until the engine
  answers the HTTP request. Unpickling trusts the sender: keep engines on a private network.
- flattened buckets: many tensors of mixed dtypes in one uint8 buffer; each tensor starts at
  an offset aligned to its element size, so the receiver can `view` it without copying.
- `init_weight_group`: a process group just for weight broadcast, built the way
  `torch.distributed.init_process_group` builds one (TCPStore at the trainer, then
  PrefixStore(group_name) / PrefixStore(group_name + "/") / PrefixStore(device + "/")) but
  without touching the default group, so it coexists with Megatron's groups.
"""

from __future__ import annotations

import base64
import datetime
import io
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}


def dtype_from_name(name: str) -> torch.dtype:
    """'bfloat16' or 'torch.bfloat16' -> torch.bfloat16 (SGLang sends the short name)."""
    key = name.removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r} (supported: {sorted(_DTYPES)})")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- ForkingPickler payloads -----------------------------------------------------------------
def serialize_named_tensors(obj) -> str:
    """base64(ForkingPickler.dumps(obj)); CPU tensors move to shared memory (file_system)."""
    mp.set_sharing_strategy("file_system")
    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def deserialize_named_tensors(payload: str | bytes):
    """Inverse of `serialize_named_tensors`; opens the sender's shared-memory handles."""
    import pickle

    raw = base64.b64decode(payload) if isinstance(payload, str) else payload
    return pickle.loads(raw)


# --- flattened buckets -----------------------------------------------------------------------
@dataclass
class FlattenedTensorMetadata:
    """Where one tensor lives in a uint8 bucket: bytes [start_idx, end_idx), `numel` elements."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def bucket_layout(names: Sequence[str], dtypes: Sequence[torch.dtype],
                  shapes: Sequence[Sequence[int]]) -> tuple[list[FlattenedTensorMetadata], int]:
    """Byte offsets of each tensor (aligned to its element size) and the total bucket size."""
    metas, offset = [], 0
    for name, dtype, shape in zip(names, dtypes, shapes):
        itemsize = torch.empty((), dtype=dtype).element_size()
        offset = -(-offset // itemsize) * itemsize
        numel = 1
        for s in shape:
            numel *= int(s)
        end = offset + numel * itemsize
        metas.append(FlattenedTensorMetadata(name, tuple(int(s) for s in shape), dtype, offset, end, numel))
        offset = end
    return metas, offset


def flatten_bucket(named_tensors: Sequence[tuple[str, torch.Tensor]],
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[FlattenedTensorMetadata]]:
    """Pack tensors into one uint8 buffer (optionally a preallocated `out`)."""
    metas, total = bucket_layout([n for n, _ in named_tensors], [t.dtype for _, t in named_tensors],
                                 [t.shape for _, t in named_tensors])
    device = named_tensors[0][1].device if named_tensors else "cpu"
    flat = torch.zeros(total, dtype=torch.uint8, device=device) if out is None else out[:total]
    for meta, (_, t) in zip(metas, named_tensors):
        flat[meta.start_idx:meta.end_idx].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    return flat, metas


def unflatten_bucket(flat: torch.Tensor, metas: Sequence[FlattenedTensorMetadata]) -> list[tuple[str, torch.Tensor]]:
    """Views into `flat` (no copy), one per metadata entry, in order."""
    if flat.dtype != torch.uint8:
        raise ValueError(f"flattened bucket must be uint8, got {flat.dtype}")
    out = []
    for m in metas:
        if m.end_idx > flat.numel():
            raise ValueError(f"bucket entry {m.name!r} ends at byte {m.end_idx} > bucket size {flat.numel()}")
        out.append((m.name, flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)))
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

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        self.pg.broadcast([tensor], opts).wait()


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
