"""Push HF-named weights from the trainer to rollout engines: disk, tensor or distributed.

One readable pipeline: `named_tensors` (already gathered over TP/PP and renamed to
HuggingFace names by the resharding room) -> buckets of ~`bucket_bytes` -> per-method send
-> every engine. Tensor and distributed pushes run inside a begin/end weight-update session
on each engine, so no completion is generated from half-updated weights.

- "disk": write an HF safetensors dir (temp dir + rename), then `update_weights_from_disk`.
  Works anywhere the engines can read the path; slowest.
- "tensor": ForkingPickler handles (CUDA IPC / CPU shared memory): engines on this node only.
- "distributed": a broadcast group (trainer = rank 0, engines = ranks 1..N): for each bucket
  every engine gets an `update_weights_from_distributed` request while the trainer
  broadcasts the bucket (one flat uint8 buffer when `flattened=True`).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from erpo_mega.models.hf_io import INDEX_NAME, ShardedSafetensorsWriter, atomic_output_dir
from erpo_mega.rollout.client import SGLangClient, WeightUpdateError
from erpo_mega.rollout.protocol import DEFAULT_GROUP_NAME
from erpo_mega.rollout.tensor_wire import (
    dtype_name,
    flatten_bucket,
    init_weight_group,
    serialize_named_tensors,
)

DEFAULT_BUCKET_BYTES = 512 * 1024 * 1024  # slime's default; verl uses 2 GB
METHODS = ("disk", "tensor", "distributed")

NamedTensors = Iterable[tuple[str, torch.Tensor]]


@dataclass
class PushReport:
    method: str
    bytes: int           # payload bytes sent once (not multiplied by the number of engines)
    seconds: float
    buckets: int
    tensors: int
    engines: int

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else float("inf")


def iter_buckets(named_tensors: NamedTensors, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Greedy consecutive groups of at most `bucket_bytes` (a larger tensor travels alone)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket, size = [], 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def _fan_out(engines: Sequence[SGLangClient], call) -> list:
    """Run `call(engine)` on every engine concurrently; re-raise the first failure."""
    with ThreadPoolExecutor(max(1, len(engines))) as pool:
        return [f.result() for f in [pool.submit(call, e) for e in engines]]


class _Sessions:
    """begin_weight_update on every engine; end on all of them however the push ends."""

    def __init__(self, engines: Sequence[SGLangClient]):
        self.engines = engines

    def __enter__(self):
        _fan_out(self.engines, lambda e: e.begin_weight_update())

    def __exit__(self, *exc):
        _fan_out(self.engines, lambda e: e.end_weight_update())


# --- disk -------------------------------------------------------------------------------------
def save_hf_safetensors(named_tensors: NamedTensors, out_dir: str | Path, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                        copy_from: str | Path | None = None) -> tuple[int, int, int]:
    """Write a sharded HF checkpoint to `out_dir` atomically; returns (bytes, shards, tensors).

    Files go to a sibling temp dir which is renamed into place, so readers never see a
    partial checkpoint. `copy_from` copies config/tokenizer JSON files from an HF dir.
    """
    n_tensors = 0
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=bucket_bytes)
        for name, t in named_tensors:
            # clone: the caller may reuse the buffer, and tied tensors must not share storage in a file
            writer.add(name, t.detach().to("cpu").clone())
            n_tensors += 1
        shards = writer.close()
        if copy_from is not None:
            for f in Path(copy_from).iterdir():
                if f.suffix == ".json" and f.name != INDEX_NAME or f.name == "tokenizer.model":
                    shutil.copy2(f, tmp / f.name)
    return writer.total_bytes, len(shards), n_tensors


def push_via_disk(named_tensors: NamedTensors, engines: Sequence[SGLangClient], out_dir: str | Path,
                  weight_version: str | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                  copy_from: str | Path | None = None) -> PushReport:
    t0 = time.perf_counter()
    nbytes, shards, n = save_hf_safetensors(named_tensors, out_dir, bucket_bytes, copy_from)
    _fan_out(engines, lambda e: e.update_weights_from_disk(str(out_dir), weight_version=weight_version))
    return PushReport("disk", nbytes, time.perf_counter() - t0, shards, n, len(engines))


# --- tensor -----------------------------------------------------------------------------------
def push_via_tensor(named_tensors: NamedTensors, engines: Sequence[SGLangClient],
                    weight_version: str | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                    flattened: bool = True) -> PushReport:
    """Engines must share this node (handles, not bytes, travel over HTTP)."""
    t0 = time.perf_counter()
    nbytes = buckets = n = 0
    with _Sessions(engines):
        for bucket in iter_buckets(named_tensors, bucket_bytes):
            # `shared` must stay referenced until every engine has answered: the payload holds
            # only handles to its shared memory, which is unlinked when the tensors are freed.
            if flattened:
                flat, metas = flatten_bucket(bucket)
                shared = {"flattened_tensor": flat, "metadata": metas}
                load_format = "flattened_bucket"
            else:  # clone: sharing moves storage to shared memory, which must not touch the caller's
                shared = [(name, t.detach().clone()) for name, t in bucket]
                load_format = None
            payload = serialize_named_tensors(shared)
            _fan_out(engines, lambda e, p=payload, lf=load_format: e.update_weights_from_tensor(
                [p], load_format=lf, weight_version=weight_version))
            del shared
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            buckets += 1
            n += len(bucket)
    return PushReport("tensor", nbytes, time.perf_counter() - t0, buckets, n, len(engines))


# --- distributed ------------------------------------------------------------------------------
class DistributedWeightSender:
    """Rank 0 of a broadcast group with the engines; create once, push many times.

    `engine_tp_sizes[i]` is the number of ranks engine i contributes (its TP size), so ranks
    are assigned contiguously after the trainer, as SGLang's `rank_offset` expects.
    """

    def __init__(self, engines: Sequence[SGLangClient], master_address: str, master_port: int,
                 backend: str = "gloo", group_name: str = DEFAULT_GROUP_NAME,
                 engine_tp_sizes: Sequence[int] | None = None, timeout_s: float = 300.0):
        self.engines = list(engines)
        self.master_address, self.master_port = master_address, int(master_port)
        self.backend, self.group_name, self.timeout_s = backend, group_name, timeout_s
        self.tp_sizes = list(engine_tp_sizes or [1] * len(self.engines))
        if len(self.tp_sizes) != len(self.engines):
            raise ValueError(f"engine_tp_sizes has {len(self.tp_sizes)} entries for {len(self.engines)} engines")
        self.world_size = 1 + sum(self.tp_sizes)
        self.pg = None
        self._pool = ThreadPoolExecutor(max(1, len(self.engines)), thread_name_prefix="weight-push")

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def connect(self) -> DistributedWeightSender:
        """Engines join (their HTTP calls block) while this process hosts the rendezvous."""
        offsets = [1 + sum(self.tp_sizes[:i]) for i in range(len(self.engines))]
        futures = [self._pool.submit(e.init_weights_update_group, self.master_address, self.master_port,
                                     off, self.world_size, self.group_name, self.backend)
                   for e, off in zip(self.engines, offsets)]
        try:
            self.pg = init_weight_group(self.master_address, self.master_port, 0, self.world_size,
                                        self.group_name, self.backend, self.timeout_s)
        finally:
            for f in futures:
                f.result()
        return self

    def push(self, named_tensors: NamedTensors, weight_version: str | None = None,
             bucket_bytes: int = DEFAULT_BUCKET_BYTES, flattened: bool = True) -> PushReport:
        if self.pg is None:
            raise RuntimeError("DistributedWeightSender.push before connect()")
        t0 = time.perf_counter()
        nbytes = buckets = n = 0
        with _Sessions(self.engines):
            for bucket in iter_buckets(named_tensors, bucket_bytes):
                tensors = [t.detach().to(self.device) for _, t in bucket]
                spec = dict(names=[name for name, _ in bucket], dtypes=[dtype_name(t.dtype) for t in tensors],
                            shapes=[list(t.shape) for t in tensors], group_name=self.group_name,
                            load_format="flattened_bucket" if flattened else None,
                            weight_version=weight_version)
                futures = [self._pool.submit(e.update_weights_from_distributed, **spec) for e in self.engines]
                try:
                    if flattened:
                        flat, _ = flatten_bucket(list(zip(spec["names"], tensors)))
                        self.pg.broadcast(flat)
                    else:
                        for t in tensors:
                            self.pg.broadcast(t.contiguous())
                finally:
                    errors = [f.exception() for f in futures]
                if any(errors):
                    raise next(e for e in errors if e)
                nbytes += sum(t.numel() * t.element_size() for t in tensors)
                buckets += 1
                n += len(bucket)
        return PushReport("distributed", nbytes, time.perf_counter() - t0, buckets, n, len(self.engines))

    def close(self) -> None:
        if self.pg is not None:
            for e in self.engines:
                try:
                    e.destroy_weights_update_group(self.group_name)
                except WeightUpdateError:
                    pass
            self.pg = None
        self._pool.shutdown(wait=False)

    def __enter__(self) -> DistributedWeightSender:
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()


# --- one entry point --------------------------------------------------------------------------
def push_weights(named_tensors: NamedTensors, engines: Sequence[SGLangClient], method: str = "tensor",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, weight_version: str | None = None, *,
                 flattened: bool = True, disk_dir: str | Path | None = None,
                 sender: DistributedWeightSender | None = None) -> PushReport:
    """Send every (hf_name, tensor) to every engine by `method` ("disk" | "tensor" | "distributed").

    "disk" needs `disk_dir`; "distributed" needs a connected `sender` (kept across steps so the
    group is created once).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not engines:
        raise ValueError("push_weights: no engines given")
    if method == "disk":
        if disk_dir is None:
            raise ValueError("push_weights(method='disk') needs disk_dir")
        return push_via_disk(named_tensors, engines, disk_dir, weight_version, bucket_bytes)
    if method == "tensor":
        return push_via_tensor(named_tensors, engines, weight_version, bucket_bytes, flattened)
    if sender is None:
        raise ValueError("push_weights(method='distributed') needs a connected DistributedWeightSender")
    if {e.base_url for e in engines} != {e.base_url for e in sender.engines}:
        raise ValueError("push_weights: `engines` differ from the sender's group members")
    return sender.push(named_tensors, weight_version, bucket_bytes, flattened)
