"""Push HF-named weights from the trainer to rollout engines: disk, tensor or distributed.

One readable pipeline: `named_tensors` (already gathered over TP/PP and renamed to
HuggingFace names by the resharding room) -> buckets of ~`bucket_bytes` -> per-method send
-> every engine. Tensor and distributed pushes follow SGLang 0.5.23's semantics, where
begin/end_weight_update does *not* hold generation: `_PushSession` pauses generation first
(`pause_mode`, default "abort": the synchronous trainer has finished its rollout, anything
still running would mix versions), opens the session, sends every bucket with
`flush_cache=False` and no weight version, closes the session, then sets the weight version
once, flushes the cache once and resumes generation, on every engine. Payloads are built as
SGLang's own code accepts them (`erpo_mega.rollout.tensor_wire`; checked with SGLang's code in
tests/rollout/test_sglang_wire.py): flattened buckets ordered for alignment, one tensor
payload per engine TP rank, and group sizes from each engine's reported `tp_size`.

- "disk": write an HF safetensors dir (temp dir + rename), then `update_weights_from_disk`.
  Works anywhere the engines can read the path; slowest.
- "tensor": ForkingPickler handles (CUDA IPC / CPU shared memory): engines on this node only.
- "distributed": a broadcast group (trainer = rank 0, engine TP ranks after it): for each
  bucket every engine gets an `update_weights_from_distributed` request while the trainer
  broadcasts the bucket (one flat uint8 buffer when `flattened=True`). The broadcast is
  watched together with the requests: an engine that refuses (HTTP 400, success: false)
  ends the push with `WeightUpdateError` at once instead of a broadcast nobody receives.
  NCCL on CUDA, gloo on CPU (`default_backend`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from erpo_mega.models.hf_io import INDEX_NAME, ShardedSafetensorsWriter, atomic_output_dir
from erpo_mega.rollout.client import EngineError, SGLangClient, WeightUpdateError
from erpo_mega.rollout.protocol import DEFAULT_GROUP_NAME
from erpo_mega.rollout.tensor_wire import (
    align_order,
    dtype_name,
    flatten_bucket,
    init_weight_group,
    serialize_per_rank,
)

log = logging.getLogger(__name__)

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


PAUSE_MODES = ("abort", "retract", "in_place")


class _PushSession:
    """pause -> begin ... end -> weight version -> flush cache -> continue, on every engine.

    On success the version is set and the cache flushed once, after the last bucket. However
    the push ends, open sessions are closed and paused engines resumed; a failure in that
    cleanup is logged, and the push's own error (if any) is the one raised.
    """

    def __init__(self, engines: Sequence[SGLangClient], weight_version: str | None, pause_mode: str | None):
        if pause_mode is not None and pause_mode not in PAUSE_MODES:
            raise ValueError(f"pause_mode must be one of {PAUSE_MODES} or None, got {pause_mode!r}")
        self.engines, self.weight_version, self.pause_mode = list(engines), weight_version, pause_mode
        self._paused: list[SGLangClient] = []
        self._open: list[SGLangClient] = []

    @staticmethod
    def _each(engines, call, into: list) -> None:
        """`call` on every engine concurrently; `into` collects those it succeeded on."""
        def one(e):
            call(e)
            into.append(e)
        _fan_out(engines, one)

    def __enter__(self) -> _PushSession:
        try:
            if self.pause_mode is not None:
                self._each(self.engines, lambda e: e.pause_generation(self.pause_mode), self._paused)
            self._each(self.engines, lambda e: e.begin_weight_update(), self._open)
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._cleanup()
            return
        try:
            _fan_out(self._open, lambda e: e.end_weight_update())
            self._open = []
            if self.weight_version is not None:
                _fan_out(self.engines, lambda e: e.update_weight_version(self.weight_version))
            _fan_out(self.engines, lambda e: e.flush_cache())
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        for what, engines, call in (("end_weight_update", self._open, lambda e: e.end_weight_update()),
                                    ("continue_generation", self._paused, lambda e: e.continue_generation())):
            for e in engines:
                try:
                    call(e)
                except Exception as err:  # keep the push's own error; still try every engine
                    log.warning("%s on %s failed during cleanup: %s", what, e.base_url, err)
        self._open, self._paused = [], []


PushSession = _PushSession  # public: the coordinating rank of a per-stage push holds one


def default_backend() -> str:
    """NCCL when this process has a GPU (engines receive on theirs), gloo on CPU."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def _pack(bucket: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """A bucket in the order it travels flattened: aligned for every dtype (SGLang's layout)."""
    return align_order(bucket)


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
                    flattened: bool = True, pause_mode: str | None = "abort") -> PushReport:
    """Engines must share this node (handles, not bytes, travel over HTTP).

    Each engine gets one payload per TP rank (its `tp_size` from server info; SGLang reads
    `serialized_named_tensors[tp_rank]`), each pickled on its own, so every rank of every
    engine opens its own handle.
    """
    t0 = time.perf_counter()
    nbytes = buckets = n = 0
    tp_sizes = [e.engine_tp_size() for e in engines]
    with _PushSession(engines, weight_version, pause_mode):
        for bucket in iter_buckets(named_tensors, bucket_bytes):
            # `shared` must stay referenced until every engine has answered: the payload holds
            # only handles to its shared memory, which is unlinked when the tensors are freed.
            if flattened:
                flat, metas = flatten_bucket(_pack(bucket))
                shared = {"flattened_tensor": flat, "metadata": metas}
                load_format = "flattened_bucket"
            else:  # clone: sharing moves storage to shared memory, which must not touch the caller's
                shared = [(name, t.detach().clone()) for name, t in bucket]
                load_format = None
            # one payload per (engine, TP rank), each pickled on its own: a CUDA IPC handle is
            # reference-counted per pickling, so no two receivers may open the same one
            payloads = [serialize_per_rank(shared, tp) for tp in tp_sizes]
            _fan_out(list(zip(engines, payloads)), lambda ep, lf=load_format: ep[0].update_weights_from_tensor(
                ep[1], load_format=lf, flush_cache=False))
            del shared, payloads
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            buckets += 1
            n += len(bucket)
    return PushReport("tensor", nbytes, time.perf_counter() - t0, buckets, n, len(engines))


# --- distributed ------------------------------------------------------------------------------
class DistributedWeightSender:
    """Rank 0 of a broadcast group with the engines; create once, push many times.

    Engine i contributes `tp_size_i` ranks (read from its server info unless
    `engine_tp_sizes` is given), assigned contiguously after the trainer: rank offsets
    1, 1 + tp_0, ..., world size 1 + sum(tp_i), as SGLang's `rank_offset` expects. A push
    that fails leaves the group unusable (a broadcast may be half-way); `push` then refuses
    until `close()` + a new sender.
    """

    def __init__(self, engines: Sequence[SGLangClient], master_address: str, master_port: int,
                 backend: str | None = None, group_name: str = DEFAULT_GROUP_NAME,
                 engine_tp_sizes: Sequence[int] | None = None, timeout_s: float = 300.0,
                 poll_s: float = 0.002):
        self.engines = list(engines)
        self.master_address, self.master_port = master_address, int(master_port)
        self.backend = backend or default_backend()
        self.group_name, self.timeout_s, self.poll_s = group_name, timeout_s, poll_s
        self.tp_sizes = list(engine_tp_sizes) if engine_tp_sizes is not None else \
            [e.engine_tp_size() for e in self.engines]
        if len(self.tp_sizes) != len(self.engines):
            raise ValueError(f"engine_tp_sizes has {len(self.tp_sizes)} entries for {len(self.engines)} engines")
        if any(int(tp) < 1 for tp in self.tp_sizes):
            raise ValueError(f"engine_tp_sizes must be >= 1, got {self.tp_sizes}")
        self.rank_offsets = [1 + sum(self.tp_sizes[:i]) for i in range(len(self.engines))]
        self.world_size = 1 + sum(self.tp_sizes)
        self.pg = None
        self.broken: str | None = None
        self._abandoned: list = []  # groups with a broadcast nobody finished: kept alive, never joined
        self._pool = ThreadPoolExecutor(max(1, len(self.engines)), thread_name_prefix="weight-push")

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def connect(self) -> DistributedWeightSender:
        """Engines join (their HTTP calls block) while this process hosts the rendezvous."""
        futures = [self._pool.submit(e.init_weights_update_group, self.master_address, self.master_port,
                                     off, self.world_size, self.group_name, self.backend)
                   for e, off in zip(self.engines, self.rank_offsets)]
        try:
            self.pg = init_weight_group(self.master_address, self.master_port, 0, self.world_size,
                                        self.group_name, self.backend, self.timeout_s)
        finally:
            for f in futures:
                f.result()
        return self

    def _broadcast_watched(self, tensors: list[torch.Tensor], futures: list) -> None:
        """Broadcast while watching the engines' requests: a refusal raises at once.

        The engine's own answer (e.g. HTTP 400 success: false) is the error raised; a broken
        transport (a receiver that left the group) becomes WeightUpdateError too.
        """
        def refusal(wait_s: float = 0.0):
            deadline = time.monotonic() + wait_s
            while True:
                failed = [f for f in futures if f.done() and f.exception() is not None]
                if failed or time.monotonic() >= deadline:
                    return failed[0].exception() if failed else None
                time.sleep(0.01)

        for t in tensors:
            try:
                work = self.pg.broadcast_async(t)
                while not work.is_completed():
                    err = refusal()
                    if err is not None:
                        self._abandoned.append((self.pg, work, t))
                        raise err
                    time.sleep(self.poll_s)
                work.wait()
            except RuntimeError as e:  # transport failure: report the engine's reason if it gave one
                err = refusal(wait_s=5.0)
                raise (err or WeightUpdateError(self.master_address, f"weight broadcast failed: {e}")) from e

    def push(self, named_tensors: NamedTensors, weight_version: str | None = None,
             bucket_bytes: int = DEFAULT_BUCKET_BYTES, flattened: bool = True,
             pause_mode: str | None = "abort", manage_session: bool = True) -> PushReport:
        """Send every tensor over the group. `manage_session=False`: someone else (the
        coordinating rank of a per-stage push) holds the engines' pause/session, and
        `weight_version`/`pause_mode` are ignored here."""
        if self.pg is None:
            raise RuntimeError("DistributedWeightSender.push before connect()")
        if self.broken:
            raise WeightUpdateError(self.master_address, f"weight-update group unusable after an earlier "
                                    f"failure ({self.broken}); close() and connect a new sender")
        t0 = time.perf_counter()
        nbytes = buckets = n = 0
        session = _PushSession(self.engines, weight_version, pause_mode) if manage_session else \
            contextlib.nullcontext()
        with session:
            for bucket in iter_buckets(named_tensors, bucket_bytes):
                if flattened:
                    bucket = _pack(bucket)
                tensors = [t.detach().to(self.device) for _, t in bucket]
                spec = dict(names=[name for name, _ in bucket], dtypes=[dtype_name(t.dtype) for t in tensors],
                            shapes=[list(t.shape) for t in tensors], group_name=self.group_name,
                            load_format="flattened_bucket" if flattened else None, flush_cache=False)
                to_send = [flatten_bucket(list(zip(spec["names"], tensors)))[0]] if flattened else \
                    [t.contiguous() for t in tensors]
                futures = [self._pool.submit(e.update_weights_from_distributed, **spec) for e in self.engines]
                try:
                    self._broadcast_watched(to_send, futures)
                    for f in futures:
                        f.result()
                except BaseException as e:
                    self.broken = f"{type(e).__name__}: {e}"
                    raise
                nbytes += sum(t.numel() * t.element_size() for t in tensors)
                buckets += 1
                n += len(bucket)
        return PushReport("distributed", nbytes, time.perf_counter() - t0, buckets, n, len(self.engines))

    def close(self) -> None:
        if self.pg is not None:
            for e in self.engines:
                try:
                    e.destroy_weights_update_group(self.group_name)
                except EngineError as err:
                    log.debug("destroy_weights_update_group on %s: %s", e.base_url, err)
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
                 sender: DistributedWeightSender | None = None, pause_mode: str | None = "abort") -> PushReport:
    """Send every (hf_name, tensor) to every engine by `method` ("disk" | "tensor" | "distributed").

    "disk" needs `disk_dir`; "distributed" needs a connected `sender` (kept across steps so the
    group is created once). `pause_mode` ("abort" | "retract" | "in_place" | None) is how
    generation is paused around a tensor/distributed push (None: the caller guarantees idle
    engines).
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
        return push_via_tensor(named_tensors, engines, weight_version, bucket_bytes, flattened, pause_mode)
    if sender is None:
        raise ValueError("push_weights(method='distributed') needs a connected DistributedWeightSender")
    if {e.base_url for e in engines} != {e.base_url for e in sender.engines}:
        raise ValueError("push_weights: `engines` differ from the sender's group members")
    return sender.push(named_tensors, weight_version, bucket_bytes, flattened, pause_mode)
