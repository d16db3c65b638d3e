"""`SGLangClient`: typed calls to an SGLang server, an sglang-router, or the embedded engine.

Failure policy: connection errors and HTTP 5xx are retried with exponential backoff (the
server may be starting or briefly overloaded); HTTP 4xx raise at once with the server's
message (retrying a bad request cannot help); a read timeout raises at once (the request may
still be running server-side). Calls whose retry would desynchronise a collective
(`init_weights_update_group`, `update_weights_from_distributed`) are never retried.

A refused weight operation is `WeightUpdateError` whichever way the server says it: SGLang
0.5.23 answers HTTP 400 with `{"success": false, "message": ...}`, older servers 200 with
`success: false`. With `api_key` every request carries `Authorization: Bearer <key>`, as
SGLang's `--api-key`, the router and the embedded engine expect; HTTP 401/403 raise
`EngineError` naming the key as the likely cause.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, is_dataclass

import orjson
import requests

from erpo_mega.rollout.protocol import DEFAULT_GROUP_NAME, GenerateOutput, SamplingParams


class EngineError(RuntimeError):
    """An engine call failed; `status` is the HTTP status (None: no response at all)."""

    def __init__(self, url: str, message: str, status: int | None = None):
        self.url, self.status = url, status
        super().__init__(f"{url}: {message}")


class WeightUpdateError(EngineError):
    """The server answered `success: false` to a weight operation."""


class SGLangClient:
    def __init__(self, base_url: str, timeout: float = 600.0, max_retries: int = 3, backoff: float = 0.5,
                 max_concurrency: int = 32, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or None
        self._server_info: dict | None = None
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_concurrency = max_concurrency
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SGLangClient({self.base_url!r})"

    # --- transport ----------------------------------------------------------------------------
    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            if self.api_key:
                s.headers["Authorization"] = f"Bearer {self.api_key}"
        return s

    def request(self, method: str, path: str, body: dict | None = None, *, retries: int | None = None,
                timeout: float | None = None):
        """One HTTP call with the retry policy; returns parsed JSON (or text for text replies)."""
        url = f"{self.base_url}{path}"
        retries = self.max_retries if retries is None else retries
        timeout = self.timeout if timeout is None else timeout
        last = ""
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self._session().request(method, url, json=body if body is not None else {},
                                               timeout=timeout)
            except requests.ReadTimeout:
                raise EngineError(url, f"no reply within {timeout:.1f}s (timeout); the request may still "
                                  "be running on the server") from None
            except requests.ConnectionError as e:
                last = f"cannot connect ({type(e).__name__}: {_short(e)})"
                continue
            if resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {_server_message(resp)}"
                continue
            if resp.status_code in (401, 403):
                hint = "wrong api key" if self.api_key else "the server requires an api key (none given)"
                raise EngineError(url, f"HTTP {resp.status_code} ({hint}): {_server_message(resp)}",
                                  resp.status_code)
            if resp.status_code >= 400:
                data = _json_or_none(resp)
                if isinstance(data, dict) and data.get("success") is False:
                    raise WeightUpdateError(url, str(data.get("message", "success: false")), resp.status_code)
                raise EngineError(url, f"HTTP {resp.status_code}: {_server_message(resp)}", resp.status_code)
            ctype = resp.headers.get("Content-Type", "")
            if "json" in ctype and resp.content:
                return _parse_json(resp)
            return resp.text
        raise EngineError(url, f"server unreachable or failing after {retries + 1} attempt(s): {last}")

    def _post(self, path: str, body: dict | None = None, **kw):
        return self.request("POST", path, body, **kw)

    def _checked(self, path: str, body: dict, **kw) -> dict:
        out = self._post(path, body, **kw)
        if isinstance(out, dict) and out.get("success") is False:
            raise WeightUpdateError(f"{self.base_url}{path}", out.get("message", "success: false"))
        return out

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="sglang-client")
            return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    # --- generation ---------------------------------------------------------------------------
    def generate(self, input_ids: Sequence[Sequence[int]], sampling_params: dict | SamplingParams | None = None,
                 return_logprob: bool = True, rids: Sequence[str] | None = None) -> list[GenerateOutput]:
        """One request per prompt, `max_concurrency` in flight (a router spreads them over workers).

        With `n > 1` in sampling_params each prompt yields n outputs, in order.
        """
        sp = _sampling_dict(sampling_params)

        def one(i: int) -> list[GenerateOutput]:
            body = {"input_ids": list(input_ids[i]), "sampling_params": sp, "return_logprob": return_logprob}
            if rids is not None:
                body["rid"] = rids[i]
            out = self._post("/generate", body)
            items = out if isinstance(out, list) else [out]
            return [GenerateOutput.from_json(item) for item in items]

        results = list(self._executor().map(one, range(len(input_ids))))
        return [o for group in results for o in group]

    def generate_raw(self, body: dict):
        """POST /generate with a caller-built body (text prompts, batch lists, input logprobs...)."""
        return self._post("/generate", body)

    # --- server state -------------------------------------------------------------------------
    def health(self, timeout: float = 10.0) -> bool:
        """GET /health; SGLang answers it with a one-token generation (>= 1 s), so give it room."""
        try:
            self.request("GET", "/health", retries=0, timeout=timeout)
            return True
        except EngineError:
            return False

    def wait_healthy(self, timeout: float = 120.0, interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.health():
                return
            time.sleep(interval)
        raise EngineError(self.base_url, f"not healthy after {timeout:.0f}s")

    def model_info(self) -> dict:
        return self.request("GET", "/model_info")

    def server_info(self) -> dict:
        """SGLang's `/server_info` (0.5.23), falling back to the older `/get_server_info`."""
        try:
            return self.request("GET", "/server_info")
        except EngineError as e:
            if e.status != 404:
                raise
        return self.request("GET", "/get_server_info")

    def engine_tp_size(self) -> int:
        """This engine's tensor-parallel size (ranks it adds to a weight group), from server info.

        Cached: a running server's layout does not change. Refuses `dp_size > 1`, which SGLang
        refuses for every weight update (one server per ENGINE_TP GPUs, behind a router, instead).
        """
        if self._server_info is None:
            info = self.server_info()
            if not isinstance(info, dict) or "tp_size" not in info:
                raise EngineError(self.base_url, "server info has no tp_size; cannot size the weight-update group")
            self._server_info = info
        info = self._server_info
        dp = int(info.get("dp_size") or 1)
        if dp != 1:
            raise WeightUpdateError(self.base_url, f"dp_size={dp}: SGLang refuses weight updates unless "
                                    "dp_size == 1; run one server per ENGINE_TP GPUs behind a router")
        tp = int(info["tp_size"])
        if tp < 1:
            raise EngineError(self.base_url, f"server info reports tp_size={tp}")
        return tp

    def flush_cache(self):
        return self._post("/flush_cache")

    def abort(self, rid: str = "", abort_all: bool = False):
        return self._post("/abort_request", {"rid": rid, "abort_all": abort_all})

    def pause_generation(self, mode: str = "abort"):
        return self._post("/pause_generation", {"mode": mode})

    def continue_generation(self):
        return self._post("/continue_generation", {})

    # --- weights ------------------------------------------------------------------------------
    def begin_weight_update(self, selector: str = "all") -> dict:
        return self._checked("/begin_weight_update", {"selector": selector})

    def end_weight_update(self) -> dict:
        return self._checked("/end_weight_update", {})

    @contextlib.contextmanager
    def weight_update_session(self, selector: str = "all") -> Iterator[SGLangClient]:
        """begin ... end, closing the session even if the update fails."""
        self.begin_weight_update(selector)
        try:
            yield self
        finally:
            self.end_weight_update()

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None,
                                 flush_cache: bool = True, abort_all_requests: bool = False,
                                 load_format: str | None = None) -> dict:
        return self._checked("/update_weights_from_disk", _drop_none(
            model_path=str(model_path), weight_version=weight_version, flush_cache=flush_cache,
            abort_all_requests=abort_all_requests, load_format=load_format))

    def update_weights_from_tensor(self, serialized_named_tensors: list[str], load_format: str | None = None,
                                   weight_version: str | None = None, flush_cache: bool = True,
                                   abort_all_requests: bool = False) -> dict:
        return self._checked("/update_weights_from_tensor", _drop_none(
            serialized_named_tensors=serialized_named_tensors, load_format=load_format,
            weight_version=weight_version, flush_cache=flush_cache, abort_all_requests=abort_all_requests))

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str = DEFAULT_GROUP_NAME,
                                  backend: str = "nccl") -> dict:
        return self._checked("/init_weights_update_group", dict(
            master_address=master_address, master_port=master_port, rank_offset=rank_offset,
            world_size=world_size, group_name=group_name, backend=backend), retries=0)

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str = DEFAULT_GROUP_NAME, load_format: str | None = None,
                                        weight_version: str | None = None, flush_cache: bool = True) -> dict:
        return self._checked("/update_weights_from_distributed", _drop_none(
            names=names, dtypes=dtypes, shapes=shapes, group_name=group_name, load_format=load_format,
            weight_version=weight_version, flush_cache=flush_cache), retries=0)

    def destroy_weights_update_group(self, group_name: str = DEFAULT_GROUP_NAME) -> dict:
        return self._checked("/destroy_weights_update_group", {"group_name": group_name})

    def release_memory_occupation(self, tags: list[str] | None = None) -> dict:
        return self._checked("/release_memory_occupation", _drop_none(tags=tags))

    def resume_memory_occupation(self, tags: list[str] | None = None) -> dict:
        return self._checked("/resume_memory_occupation", _drop_none(tags=tags))

    def get_weights_by_name(self, name: str, truncate_size: int = 100):
        return self._post("/get_weights_by_name", {"name": name, "truncate_size": truncate_size})

    def update_weight_version(self, new_version: str, abort_all_requests: bool = False) -> dict:
        return self._checked("/update_weight_version",
                             {"new_version": new_version, "abort_all_requests": abort_all_requests})


def _sampling_dict(sp) -> dict:
    if sp is None:
        return {}
    if is_dataclass(sp):
        defaults = asdict(SamplingParams())
        return {k: v for k, v in asdict(sp).items() if v != defaults[k]}
    return dict(sp)


def _drop_none(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def _short(e: Exception, limit: int = 200) -> str:
    s = str(e)
    return s if len(s) <= limit else s[:limit] + "..."


def _parse_json(resp: requests.Response):
    """The body as JSON: orjson first (a 128 x 32-token /generate answer with log-probs parses in
    ~0.7 ms instead of ~2.4 ms), the standard parser for what orjson refuses (NaN literals)."""
    try:
        return orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        return resp.json()


def _json_or_none(resp: requests.Response):
    try:
        return resp.json()
    except ValueError:
        return None


def _server_message(resp: requests.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return _short(Exception(resp.text or resp.reason), 500)
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if "message" in data:
            return str(data["message"])
        if "detail" in data:
            return str(data["detail"])
    return _short(Exception(str(data)), 500)
