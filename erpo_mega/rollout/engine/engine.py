"""The embedded engine's state machine: requests, batching, weight updates, memory release.

One worker thread runs continuous batching (`runner.BatchRunner`): every step it admits
queued sequences up to `max_batch_size` (`--max-running-requests`, counted in sequences, so
one request with a large `n` is admitted in parts) and decodes one token for all running
ones; a request is answered as soon as its own sequences finish. HTTP handler threads call
the methods here. The worker holds `model_lock` for as long as any sequence runs; a weight
update waits for that lock, and while anyone waits for it no new sequence is admitted, so the
running ones drain (or end at once when `abort_all_requests` is set), as SGLang does, and no
completion ever mixes two weight versions. Generation is held (queued, not refused) while
paused or while a begin/end weight-update session is open.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from erpo_mega.models.hf_io import ConversionError
from erpo_mega.models.torch_llm import RowWorkers, TorchLLM, iter_hf_safetensors
from erpo_mega.rollout import protocol as P
from erpo_mega.rollout.engine.runner import BatchRunner, Sequence
from erpo_mega.rollout.tensor_wire import (
    UnsafePayloadError,
    WeightGroup,
    bucket_layout,
    deserialize_named_tensors,
    dtype_from_name,
    init_weight_group,
    unflatten_bucket,
)

log = logging.getLogger("erpo_mega.engine")

# A generous bound on characters per token, so an oversized text is refused before tokenizing.
MAX_CHARS_PER_TOKEN = 64


class EngineUnavailable(RuntimeError):
    """Generation refused for a state reason (memory released); answered with HTTP 409."""


class _Pending:
    """One /generate call: done when all of its sequences have finished."""

    def __init__(self, seqs: list[Sequence]):
        self.seqs = seqs
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._left = len(seqs)
        self._lock = threading.Lock()
        for s in seqs:
            s.on_finish = self._one_finished

    def _one_finished(self, seq: Sequence) -> None:
        with self._lock:
            if seq.error is not None:
                self.error = seq.error
            self._left -= 1
            if self._left == 0:
                self.done.set()


class _ModelLock:
    """A re-entrant lock that counts who waits for it.

    The generation worker holds it while sequences run; weight operations take it with
    `with`. A waiting weight operation stops admission (`waiting > 0`), so the running batch
    drains and the update cannot starve behind a stream of new requests.
    """

    def __init__(self):
        self._lock = threading.RLock()
        self._count = threading.Lock()
        self.waiting = 0

    def __enter__(self):
        with self._count:
            self.waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._count:
                self.waiting -= 1
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def acquire(self) -> None:  # the worker: does not count as a waiter
        self._lock.acquire()

    def release(self) -> None:
        self._lock.release()


class Engine:
    def __init__(self, model_path: str, dtype: str = "float32", random_seed: int = 0,
                 max_batch_size: int = 256, skip_tokenizer_init: bool = False,
                 enable_memory_saver: bool = False, tokenizer_path: str | None = None):
        self.model_path = str(model_path)
        self.tokenizer_path = str(tokenizer_path or model_path)
        self.dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
                      "float16": torch.float16}[dtype]
        self.max_batch_size = max_batch_size
        self.decode_window = 16  # most decode steps per runner call when no request waits (BatchRunner.step)
        self.skip_tokenizer_init = skip_tokenizer_init
        self.enable_memory_saver = enable_memory_saver
        self.model: TorchLLM | None = None
        self.tokenizer = None
        self.ready = threading.Event()
        self.weight_version = "default"
        self._seed_rng = torch.Generator().manual_seed(random_seed)
        self.model_lock = _ModelLock()
        self._cv = threading.Condition()
        self._queue: list[Sequence] = []
        self._runner: BatchRunner | None = None
        self._running: list[Sequence] = []
        self._paused = False
        self._in_session = False
        # A begin_weight_update session holds generation; one nobody ends (a crashed trainer,
        # a stranger) is closed after this many idle seconds so generation resumes.
        self.session_timeout_s = 300.0
        self._session_timer: threading.Timer | None = None
        self._released: set[str] = set()
        self._groups: dict[str, WeightGroup] = {}
        self.requests_total = 0
        self._stop = False
        self._worker = threading.Thread(target=self._loop, name="engine-worker", daemon=True)

    # --- lifecycle ---------------------------------------------------------------------------
    def load(self, start_worker: bool = True) -> None:
        """Load weights (and tokenizer). `start_worker=False`: the caller runs `run_generation()`
        on its main thread instead of a background thread (see there why)."""
        self.model = TorchLLM.from_hf_dir(self.model_path, dtype=self.dtype)
        if not self.skip_tokenizer_init and _has_tokenizer(self.tokenizer_path):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        if start_worker:
            self._worker.start()
        self.ready.set()
        log.info("engine ready: %s (%s params)", self.model_path,
                 sum(p.numel() for p in self.model.parameters()))

    def use_row_threads(self, n: int) -> bool:
        """Split each decode/prefill batch over `n` single-threaded row workers instead of giving
        torch `n` intra-op threads (`TorchLLM.row_workers` says why). Only on the native fp32 CPU
        path and unless `ERPO_ROW_THREADS=0`; sets torch's intra-op threads to 1 for this process
        (the engine's own: `serve` calls this). Returns whether it took effect."""
        if n < 2 or self.model is None or self.model._native_kernels() is None \
                or os.environ.get("ERPO_ROW_THREADS", "1") == "0":
            return False
        self.model.row_workers = RowWorkers(n)
        torch.set_num_threads(1)
        log.info("decode rows split over %d worker threads (torch intra-op threads: 1)", n)
        return True

    def run_generation(self) -> None:
        """The generation loop in the calling thread, until `shutdown()`.

        Why the main thread: with torch's OpenMP intra-op pool, ops issued from a secondary
        Python thread ran single-threaded here (a 2-thread decode step took the 1-thread time);
        `python -m erpo_mega.rollout.serve` therefore runs this on its main thread.
        """
        self._loop()

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()

    # --- generation ---------------------------------------------------------------------------
    def generate(self, body: dict, disconnected: Callable[[], bool] | None = None) -> dict | list[dict]:
        """Queue the request's sequences and wait for them; `disconnected()` (polled while
        waiting) True aborts them, so a client that hung up frees its batch rows."""
        req = P.parse(P.GenerateReqInput, body, "generate")
        if self._released:
            raise EngineUnavailable(f"memory released ({sorted(self._released)}); "
                                    "call /resume_memory_occupation first")
        seqs = self._build_sequences(req)
        pending = _Pending(seqs)
        self.requests_total += 1
        with self._cv:
            self._queue.extend(seqs)
            self._cv.notify_all()
        while not pending.done.wait(0.25):
            if disconnected is not None and disconnected():
                for s in seqs:
                    s.abort_message = "Aborted: client disconnected"
                    s.abort.set()
                with self._cv:
                    self._cv.notify_all()
                disconnected = None
        if pending.error is not None:
            raise pending.error
        outs = [self._output(s) for s in seqs]
        return outs if req.is_batch or len(outs) > 1 else outs[0]

    def _build_sequences(self, req: P.GenerateReqInput) -> list[Sequence]:
        cfg = self.model.config
        seqs = []
        shared = None  # one sampling_params dict for the whole batch is parsed once (parsing is not cheap)
        for i in range(req.batch_size):
            per_item = isinstance(req.sampling_params, list)
            if per_item or shared is None:
                where = f"generate.sampling_params[{i}]" if per_item else "generate.sampling_params"
                sp = P.parse_sampling_params(req.per_item("sampling_params", i, {}), where)
                sp.verify(cfg.vocab_size)
                shared = None if per_item else sp
            sp = shared or sp
            for name in ("json_schema", "regex", "ebnf", "structural_tag", "stop_regex"):
                if getattr(sp, name):
                    raise P.ProtocolError(f"sampling_params.{name}: constrained decoding is not "
                                          "supported by the embedded engine")
            prompt = self._prompt_ids(req, i)
            if sp.stop and self.tokenizer is None:
                raise P.ProtocolError("sampling_params.stop: stop strings need a tokenizer; the server "
                                      "has none (use stop_token_ids)")
            room = cfg.max_position_embeddings - len(prompt)
            if room <= 0:
                raise P.ProtocolError(f"input_ids: prompt of {len(prompt)} tokens exceeds the context "
                                      f"length {cfg.max_position_embeddings}")
            max_new = room if sp.max_new_tokens is None else min(sp.max_new_tokens, room)
            stop_ids = set(sp.stop_token_ids or [])
            if not sp.ignore_eos:
                stop_ids |= self._eos_ids()
            rid = req.per_item("rid", i, None) or uuid.uuid4().hex
            drawn = [] if sp.sampling_seed is not None else \
                torch.randint(0, 2**62, (sp.n,), generator=self._seed_rng).tolist()  # one call per prompt
            for j in range(sp.n):
                seed = sp.sampling_seed + j if sp.sampling_seed is not None else drawn[j]
                seqs.append(Sequence(
                    rid=rid if sp.n == 1 else f"{rid}-{j}", prompt_ids=prompt, params=sp,
                    generator=torch.Generator().manual_seed(seed), stop_ids=stop_ids,
                    max_new_tokens=max_new, return_logprob=bool(req.per_item("return_logprob", i, False)),
                    logprob_start_len=int(req.per_item("logprob_start_len", i, -1)),
                    stop_strings=list(sp.stop or []), decode=self._decode_fn(sp)))
        return seqs

    def _prompt_ids(self, req: P.GenerateReqInput, i: int) -> list[int]:
        if req.input_ids is not None:
            ids = req.input_ids[i] if req.is_batch else req.input_ids
        else:
            if self.tokenizer is None:
                raise P.ProtocolError("text: the server has no tokenizer; send input_ids")
            text = req.text[i] if req.is_batch else req.text
            limit = MAX_CHARS_PER_TOKEN * self.model.config.max_position_embeddings
            if len(text) > limit:  # refuse before tokenizing: a huge text costs GBs in the tokenizer
                raise P.ProtocolError(f"text: prompt {i} has {len(text)} characters, more than the context "
                                      f"length {self.model.config.max_position_embeddings} tokens can hold "
                                      f"({MAX_CHARS_PER_TOKEN} characters per token at most)")
            ids = self.tokenizer.encode(text)
        if not ids:
            raise P.ProtocolError(f"input_ids: prompt {i} is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise P.ProtocolError(f"input_ids: token id {bad[0]} outside the vocabulary [0, {vocab})")
        return list(ids)

    def _eos_ids(self) -> set[int]:
        ids = set()
        if self.model.config.eos_token_id is not None:
            ids.add(int(self.model.config.eos_token_id))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def _decode_fn(self, sp: P.SamplingParams):
        if self.tokenizer is None:
            return None
        return lambda ids: self.tokenizer.decode(ids, skip_special_tokens=sp.skip_special_tokens)

    def _output(self, s: Sequence) -> dict:
        text = s.decode(s.output_ids) if s.decode is not None else None
        if text is not None and s.finish_reason and isinstance(s.finish_reason.get("matched"), str) \
                and not s.params.no_stop_trim:
            text = text[: text.find(s.finish_reason["matched"])]
        meta = {
            "id": s.rid, "finish_reason": s.finish_reason, "prompt_tokens": len(s.prompt_ids),
            "completion_tokens": len(s.output_ids), "cached_tokens": 0,
            "weight_version": s.weight_version or self.weight_version,
        }
        if s.return_logprob:
            tok_text = (lambda t: self.tokenizer.decode([t])) if self.tokenizer is not None else (lambda t: None)
            if self.tokenizer is None:
                meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(s.output_logprobs, s.output_ids)]
            else:
                meta["output_token_logprobs"] = [[lp, t, tok_text(t)] for lp, t in zip(s.output_logprobs, s.output_ids)]
            if s.input_logprobs is not None:
                start = s.logprob_start_len
                meta["input_token_logprobs"] = [[lp, t, tok_text(t)] for lp, t in
                                                zip(s.input_logprobs, s.prompt_ids[start:])]
        return {"text": text if text is not None else "", "output_ids": s.output_ids, "meta_info": meta}

    def _generation_blocked(self) -> bool:
        return self._paused or self._in_session

    def _loop(self) -> None:
        runner = self._runner = BatchRunner(self.model)
        holding = False  # the worker holds model_lock while any sequence runs
        while True:
            with self._cv:
                while not self._stop and not self._can_admit() and \
                        (not runner.active or self._paused):
                    self._cv.wait(0.05 if self._queue else 0.25)
                if self._stop:
                    return
                admit: list[Sequence] = []
                if self._can_admit():
                    room = self.max_batch_size - runner.active
                    admit, self._queue = self._queue[:room], self._queue[room:]
                self._running = runner.seqs + admit
            if not holding:
                self.model_lock.acquire()
                holding = True
            finished: list[Sequence] = []
            try:
                for s in admit:
                    s.weight_version = self.weight_version
                finished = runner.admit(admit)
                # with nobody waiting to join, a few decode steps may run in one native call
                finished += runner.step(1 if self._queue else self.decode_window)
            except BaseException as e:  # surfaced to every affected request as HTTP 500
                log.exception("generation step failed")
                affected = {id(s): s for s in [*runner.abort_all({"type": "abort", "message": str(e)}), *admit]}
                finished = list(affected.values())
                for s in finished:
                    s.error = e
            for s in finished:
                if s.on_finish is not None:
                    s.on_finish(s)
            with self._cv:
                self._running = list(runner.seqs)
            if not runner.active:
                self.model_lock.release()
                holding = False

    def _can_admit(self) -> bool:
        """New sequences may join: queued work, room, not paused/in a session, no weight op waiting."""
        return bool(self._queue) and not self._generation_blocked() and \
            self.model_lock.waiting == 0 and len(self._running) < self.max_batch_size

    def abort(self, body: dict) -> dict:
        req = P.parse(P.AbortReq, body, "abort_request")
        return {"num_aborted": self._abort(None if req.abort_all else req.rid)}

    def _abort(self, rid: str | None, message: str = "Aborted by request") -> int:
        with self._cv:
            seqs = list(self._running) + list(self._queue)
        hit = 0
        for s in seqs:
            if rid is None or s.rid == rid or s.rid.startswith(f"{rid}-"):
                s.abort_message = message
                s.abort.set()
                hit += 1
        return hit

    def pause_generation(self, body: dict) -> dict:
        req = P.parse(P.PauseGenerationReqInput, body, "pause_generation")
        if req.mode == "abort":
            self._abort(None, "Aborted by pause_generation")
            with self.model_lock:  # the running batch ends at its next step, seeing the abort
                with self._cv:
                    self._paused = True
        else:  # retract / in_place: running sequences hold between decode steps
            with self._cv:
                self._paused = True
        return {"success": True, "message": f"paused ({req.mode})"}

    def continue_generation(self, body: dict) -> dict:
        with self._cv:
            self._paused = False
            self._cv.notify_all()
        return {"success": True, "message": "continued"}

    # --- weights ------------------------------------------------------------------------------
    def _commit(self, named: list[tuple[str, torch.Tensor]], weight_version: str | None) -> str:
        """Validate all names/shapes first, then copy in under the model lock (all or nothing)."""
        self.model.check_named_shapes((n, t.shape) for n, t in named)
        with self.model_lock:
            self.model.load_named_tensors(named)
            if weight_version is not None:
                self.weight_version = weight_version
        return f"updated {len(named)} tensors; weight_version={self.weight_version}"

    def _prepare_update(self, abort_all: bool) -> None:
        if "weights" in self._released:
            raise EngineUnavailable("weights are released; call /resume_memory_occupation first")
        if abort_all:
            self._abort(None, "Aborted by weight update")

    def update_weights_from_disk(self, body: dict) -> dict:
        req = P.parse(P.UpdateWeightFromDiskReqInput, body, "update_weights_from_disk")
        try:
            self._prepare_update(req.abort_all_requests)
            named = list(iter_hf_safetensors(req.model_path))
            msg = self._commit(named, req.weight_version)
        except (OSError, KeyError, ValueError, ConversionError, EngineUnavailable) as e:
            return {"success": False, "message": f"Failed to update weights from {req.model_path}: {e}",
                    "num_paused_requests": 0}
        self.model_path = req.model_path
        return {"success": True, "message": msg, "num_paused_requests": 0}

    def _session_error(self, what: str) -> dict | None:
        if not self._in_session:
            return {"success": False, "message": f"{what} must be called inside a weight-update session: "
                    "POST /begin_weight_update first and /end_weight_update after"}
        return None

    def update_weights_from_tensor(self, body: dict) -> dict:
        req = P.parse(P.UpdateWeightsFromTensorReqInput, body, "update_weights_from_tensor")
        err = self._session_error("update_weights_from_tensor")
        if err:
            return err
        if not req.serialized_named_tensors:
            raise P.ProtocolError("serialized_named_tensors: empty list (one entry per TP rank expected)")
        self._touch_session()
        try:
            # Decode and check the payload before anything else happens (no abort, no copy):
            # a refused payload leaves the engine exactly as it was. This engine is TP rank 0.
            named = _named_tensors_from_payload(
                deserialize_named_tensors(req.serialized_named_tensors[0]), req.load_format)
            self._prepare_update(req.abort_all_requests)
            msg = self._commit(named, req.weight_version)
        except UnsafePayloadError as e:
            log.warning("update_weights_from_tensor refused: %s", e)
            return {"success": False, "message": f"Failed to update weights from tensor: {e}"}
        except (KeyError, ValueError, TypeError, RuntimeError, EngineUnavailable) as e:
            return {"success": False, "message": f"Failed to update weights from tensor: {e}"}
        return {"success": True, "message": msg}

    def init_weights_update_group(self, body: dict) -> dict:
        req = P.parse(P.InitWeightsUpdateGroupReqInput, body, "init_weights_update_group")
        if req.group_name in self._groups:
            return {"success": False, "message": f"group {req.group_name!r} already exists"}
        try:
            pg = init_weight_group(req.master_address, req.master_port, req.rank_offset, req.world_size,
                                   req.group_name, req.backend)
        except (RuntimeError, ValueError) as e:
            return {"success": False, "message": f"Failed to init group {req.group_name!r}: {e}"}
        self._groups[req.group_name] = pg
        return {"success": True, "message": f"joined {req.group_name!r} as rank {req.rank_offset}"}

    def update_weights_from_distributed(self, body: dict) -> dict:
        req = P.parse(P.UpdateWeightsFromDistributedReqInput, body, "update_weights_from_distributed")
        err = self._session_error("update_weights_from_distributed")
        if err:
            return err
        pg = self._groups.get(req.group_name)
        if pg is None:
            return {"success": False, "message": f"no weight-update group {req.group_name!r}; "
                    "call /init_weights_update_group first"}
        self._touch_session()
        try:
            dtypes = [dtype_from_name(d) for d in req.dtypes]
            # as SGLang: refuse (before receiving) a layout it cannot view in place
            layout = bucket_layout(req.names, dtypes, req.shapes) if req.load_format == "flattened_bucket" else None
        except ValueError as e:
            return {"success": False, "message": f"Failed to update weights from distributed: {e}"}
        device = self.model.lm_head.weight.device if pg.backend == "nccl" else "cpu"
        # Receive everything before validating: a sender mid-broadcast must never hang.
        if layout is not None:
            metas, total = layout
            flat = torch.empty(total, dtype=torch.uint8, device=device)
            pg.broadcast(flat)
            named = unflatten_bucket(flat, metas)
        else:
            named = []
            for name, dtype, shape in zip(req.names, dtypes, req.shapes):
                t = torch.empty(shape, dtype=dtype, device=device)
                pg.broadcast(t)
                named.append((name, t))
        try:
            self._prepare_update(req.abort_all_requests)
            msg = self._commit(named, req.weight_version)
        except (KeyError, ValueError, EngineUnavailable) as e:
            return {"success": False, "message": f"Failed to update weights from distributed: {e}"}
        return {"success": True, "message": msg}

    def destroy_weights_update_group(self, body: dict) -> dict:
        req = P.parse(P.DestroyWeightsUpdateGroupReqInput, body, "destroy_weights_update_group")
        pg = self._groups.pop(req.group_name, None)
        if pg is None:
            return {"success": False, "message": f"no weight-update group {req.group_name!r}"}
        return {"success": True, "message": f"destroyed {req.group_name!r}"}

    def begin_weight_update(self, body: dict) -> dict:
        P.parse(P.BeginWeightUpdateReqInput, body, "begin_weight_update")
        with self._cv:
            if self._in_session:
                return {"success": False, "message": "a weight-update session is already open"}
            self._in_session = True
        self._touch_session()
        with self.model_lock:  # wait for the running batch: no completion spans two versions
            pass
        return {"success": True, "message": "weight-update session open"}

    def end_weight_update(self, body: dict) -> dict:
        P.parse(P.EndWeightUpdateReqInput, body, "end_weight_update")
        with self._cv:
            if not self._in_session:
                return {"success": False, "message": "no weight-update session is open"}
            self._close_session()
        return {"success": True, "message": "weight-update session closed"}

    def _touch_session(self) -> None:
        """(Re)arm the idle timer of the open session: every weight operation extends it."""
        with self._cv:
            if not self._in_session:
                return
            if self._session_timer is not None:
                self._session_timer.cancel()
            timer = threading.Timer(self.session_timeout_s, self._expire_session)
            timer.daemon = True
            self._session_timer = timer
            timer.start()

    def _close_session(self) -> None:  # under self._cv
        self._in_session = False
        if self._session_timer is not None:
            self._session_timer.cancel()
            self._session_timer = None
        self._cv.notify_all()

    def _expire_session(self) -> None:
        with self._cv:
            if self._in_session and self._session_timer is threading.current_thread():
                log.warning("weight-update session idle for %.0fs: closed, generation resumes",
                            self.session_timeout_s)
                self._close_session()

    def get_weights_by_name(self, body: dict):
        req = P.parse(P.GetWeightsByNameReqInput, body, "get_weights_by_name")
        if "weights" in self._released:
            raise EngineUnavailable("weights are released")
        params = dict(self.model.named_parameters(remove_duplicate=False))
        if req.name not in params:
            raise P.ProtocolError(f"name: unknown parameter {req.name!r}")
        with self.model_lock:
            return params[req.name].detach()[: req.truncate_size].float().tolist()

    def update_weight_version(self, body: dict) -> dict:
        req = P.parse(P.UpdateWeightVersionReqInput, body, "update_weight_version")
        if req.abort_all_requests:
            self._abort(None, "Aborted by update_weight_version")
        with self.model_lock:
            self.weight_version = req.new_version
        return {"success": True, "message": f"weight_version={req.new_version}"}

    # --- memory -------------------------------------------------------------------------------
    def release_memory_occupation(self, body: dict) -> dict:
        """On CPU: 'weights' frees parameter storage (and the fused decode copies); 'kv_cache' frees the
        slot cache (rebuilt on the next admission); both, and 'cuda_graph', refuse generation."""
        req = P.parse(P.ReleaseMemoryOccupationReqInput, body, "release_memory_occupation")
        if not self.enable_memory_saver:
            return {"success": False, "message": "start the server with --enable-memory-saver"}
        tags = set(req.tags or P.MEMORY_TAGS)
        with self._cv:
            if self._queue or self._running:
                return {"success": False, "message": "server is not idle; release needs no requests in flight"}
            self._released |= tags
        if "weights" in tags:
            with self.model_lock:
                for p in self.model.parameters():
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
                self.model.clear_fused()
        if "kv_cache" in tags and self._runner is not None:
            with self.model_lock:
                self._runner.cache = None
        return {"success": True, "message": f"released {sorted(tags)}"}

    def resume_memory_occupation(self, body: dict) -> dict:
        """'weights' reloads the last loaded checkpoint (`model_path`); push fresh weights after."""
        req = P.parse(P.ResumeMemoryOccupationReqInput, body, "resume_memory_occupation")
        tags = set(req.tags or P.MEMORY_TAGS)
        if "weights" in tags and "weights" in self._released:
            fresh = TorchLLM.from_hf_dir(self.model_path, dtype=self.dtype)
            with self.model_lock:
                for (_, p), (_, q) in zip(self.model.named_parameters(), fresh.named_parameters()):
                    p.data = q.data
                self.model.clear_fused()  # a fused copy keyed on a reused address must not survive
        with self._cv:
            self._released -= tags
        return {"success": True, "message": f"resumed {sorted(tags)}"}

    # --- info ---------------------------------------------------------------------------------
    def model_info(self) -> dict:
        return {"model_path": self.model_path, "tokenizer_path": self.tokenizer_path if self.tokenizer else None,
                "is_generation": True, "weight_version": self.weight_version,
                "preferred_sampling_params": None, "has_image_understanding": False,
                "has_audio_understanding": False, "model_type": self.model.config.arch if self.model else None}

    def server_info(self) -> dict:
        return {"model_path": self.model_path, "dtype": str(self.dtype).removeprefix("torch."), "tp_size": 1,
                "dp_size": 1,
                "weight_version": self.weight_version, "max_batch_size": self.max_batch_size,
                "engine": "erpo_mega.embedded", "requests_total": self.requests_total,
                "max_running_requests": self.max_batch_size, "num_running_reqs": len(self._running),
                "num_queued_reqs": len(self._queue),
                "enable_memory_saver": self.enable_memory_saver,
                "time": time.time()}


def _named_tensors_from_payload(obj, load_format: str | None) -> list[tuple[str, torch.Tensor]]:
    """A deserialized `serialized_named_tensors` entry -> [(name, tensor)], structure-checked."""
    if load_format == "flattened_bucket":
        if not isinstance(obj, dict) or "flattened_tensor" not in obj or "metadata" not in obj:
            raise ValueError("flattened_bucket payload must be {'flattened_tensor': ..., 'metadata': [...]}")
        return unflatten_bucket(obj["flattened_tensor"], list(obj["metadata"]))
    if load_format not in (None, "direct"):
        raise ValueError(f"load_format {load_format!r} is not supported (null, 'direct', 'flattened_bucket')")
    if not isinstance(obj, (list, tuple)) or not all(
            isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], torch.Tensor)
            for x in obj):
        raise ValueError("payload must be a list of (name, tensor) pairs")
    return [(n, t) for n, t in obj]


def _has_tokenizer(path: str) -> bool:
    p = Path(path)
    return (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()
