"""SGLang's HTTP protocol (0.5.23) as typed requests: one module for the client and the engine.

Field names are SGLang's exactly, so the same JSON works against `sglang.launch_server`,
`sglang_router` and our embedded engine. Validation mirrors SGLang's:
- `sampling_params` keys are strict: an unknown key (e.g. `seed` instead of
  `sampling_seed`) is a `ProtocolError`, which servers answer with HTTP 400;
- top-level request fields that we do not know are ignored, as SGLang's FastAPI dataclass
  bodies ignore them; known fields are type-checked;
- `None` for a non-optional sampling parameter means "use the default" (SGLang's rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from erpo_mega.config import ConfigError, from_dict, to_dict

DEFAULT_GROUP_NAME = "weight_update_group"
LOAD_FORMATS = (None, "direct", "flattened_bucket")
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


class ProtocolError(ValueError):
    """A request is malformed; the message names the field. Servers answer HTTP 400."""


def parse(cls, data: Any, where: str, strict: bool = False):
    """Build request dataclass `cls` from JSON; `strict` rejects unknown keys (else ignored)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProtocolError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if not strict:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
    try:
        ids = data.get("input_ids")
        if cls is GenerateReqInput and _plain_token_ids(ids):
            # the generic per-element check costs ~15 us a token (1.9 ms for 128 x 12 ids): the
            # ids are checked here at once, the other fields as usual
            req = from_dict(cls, {**data, "input_ids": [0]}, source=where)
            req.input_ids = ids
            return req
        return from_dict(cls, data, source=where)
    except ConfigError as e:
        raise ProtocolError(str(e).replace("config key", "field", 1)) from None


def _plain_token_ids(v: Any) -> bool:
    """A non-empty list of ints or of lists of ints (no bools): what `from_dict` accepts unchanged."""
    if type(v) is not list or not v:
        return False
    if type(v[0]) is list:
        return all(type(row) is list and all(type(t) is int for t in row) for row in v)
    return all(type(t) is int for t in v)


def dump(obj) -> dict:
    """JSON body of a request dataclass, without None values (SGLang applies its defaults)."""
    return {k: v for k, v in to_dict(obj).items() if v is not None}


# --- /generate --------------------------------------------------------------------------------
@dataclass
class SamplingParams:
    """SGLang's `SamplingParams` API fields (strict key set)."""

    max_new_tokens: int | None = 128
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = -1
    min_p: float | None = 0.0
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    repetition_penalty: float | None = 1.0
    min_new_tokens: int | None = 0
    n: int | None = 1
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    no_stop_trim: bool | None = False
    custom_params: dict | None = None
    stream_interval: int | None = None
    logit_bias: dict[str, float] | None = None
    sampling_seed: int | None = None

    def __post_init__(self) -> None:
        defaults = {f.name: f.default for f in fields(self)}
        for name in ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
                     "repetition_penalty", "min_new_tokens", "n", "ignore_eos", "skip_special_tokens",
                     "spaces_between_special_tokens", "no_stop_trim"):
            if getattr(self, name) is None:
                setattr(self, name, defaults[name])
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.stop_regex, str):
            self.stop_regex = [self.stop_regex]

    @property
    def greedy(self) -> bool:
        """SGLang treats temperature < 1e-6 (and top_k == 1) as greedy argmax."""
        return self.temperature < 1e-6 or self.top_k == 1

    def verify(self, vocab_size: int) -> None:
        """SGLang's range checks; raises `ProtocolError` naming the parameter."""
        def bad(name, msg):
            raise ProtocolError(f"sampling_params.{name}: {msg}")

        if not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", f"must be a non-negative finite number, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.top_k != -1 and self.top_k < 1:
            bad("top_k", f"must be -1 (disable) or at least 1, got {self.top_k}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}")
        if self.min_new_tokens < 0:
            bad("min_new_tokens", f"must be >= 0, got {self.min_new_tokens}")
        if self.max_new_tokens is not None:
            if self.max_new_tokens < 0:
                bad("max_new_tokens", f"must be at least 0, got {self.max_new_tokens}")
            if self.min_new_tokens > self.max_new_tokens:
                bad("min_new_tokens", f"must be <= max_new_tokens ({self.max_new_tokens})")
        if self.n < 1:
            bad("n", f"must be >= 1, got {self.n}")
        for tok in self.stop_token_ids or []:
            if not 0 <= tok < vocab_size:
                bad("stop_token_ids", f"token id {tok} outside [0, {vocab_size})")
        for key in self.logit_bias or {}:
            try:
                ok = 0 <= int(key) < vocab_size
            except ValueError:
                ok = False
            if not ok:
                bad("logit_bias", f"keys must be token ids in [0, {vocab_size - 1}], got {key!r}")
        if sum(x is not None for x in (self.json_schema, self.regex, self.ebnf)) > 1:
            bad("regex", "only one of regex, json_schema or ebnf can be set")


def parse_sampling_params(data: Any, where: str = "sampling_params") -> SamplingParams:
    return parse(SamplingParams, data, where, strict=True)


@dataclass
class GenerateReqInput:
    text: str | list[str] | None = None
    input_ids: list[list[int]] | list[int] | None = None
    sampling_params: dict | list[dict] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False

    def __post_init__(self) -> None:
        if (self.text is None) == (self.input_ids is None):
            raise ProtocolError("generate: exactly one of 'text' or 'input_ids' must be given")
        if self.stream:
            raise ProtocolError("generate: 'stream' is not supported by this server; send stream=false")

    @property
    def is_batch(self) -> bool:
        if self.text is not None:
            return isinstance(self.text, list)
        return bool(self.input_ids) and isinstance(self.input_ids[0], list)

    @property
    def batch_size(self) -> int:
        if not self.is_batch:
            return 1
        return len(self.text if self.text is not None else self.input_ids)

    def per_item(self, name: str, i: int, default):
        """Field `name` for prompt i: SGLang allows a scalar (shared) or one value per prompt."""
        value = getattr(self, name)
        if isinstance(value, list) and self.is_batch:
            if len(value) != self.batch_size:
                raise ProtocolError(f"generate: '{name}' has {len(value)} entries for "
                                    f"{self.batch_size} prompts")
            value = value[i]
        return default if value is None else value


# --- weight updates ---------------------------------------------------------------------------
@dataclass
class UpdateWeightFromDiskReqInput:
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    flush_cache: bool = True
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False


@dataclass
class UpdateWeightsFromTensorReqInput:
    """`serialized_named_tensors[i]` is for engine TP rank i: base64 of ForkingPickler bytes."""

    serialized_named_tensors: list[str]
    load_format: str | None = field(default=None, metadata={"choices": LOAD_FORMATS})
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None


@dataclass
class InitWeightsUpdateGroupReqInput:
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = DEFAULT_GROUP_NAME
    backend: str = field(default="nccl", metadata={"choices": ("nccl", "gloo")})


@dataclass
class UpdateWeightsFromDistributedReqInput:
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = DEFAULT_GROUP_NAME
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: str | None = field(default=None, metadata={"choices": LOAD_FORMATS})

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.dtypes) == len(self.shapes)):
            raise ProtocolError(f"update_weights_from_distributed: names ({len(self.names)}), dtypes "
                                f"({len(self.dtypes)}) and shapes ({len(self.shapes)}) differ in length")


@dataclass
class DestroyWeightsUpdateGroupReqInput:
    group_name: str = DEFAULT_GROUP_NAME


@dataclass
class BeginWeightUpdateReqInput:
    selector: str = "all"


@dataclass
class EndWeightUpdateReqInput:
    pass


@dataclass
class GetWeightsByNameReqInput:
    name: str
    truncate_size: int = 100


@dataclass
class UpdateWeightVersionReqInput:
    new_version: str
    abort_all_requests: bool = False


@dataclass
class ReleaseMemoryOccupationReqInput:
    tags: list[str] | None = None

    def __post_init__(self) -> None:
        for t in self.tags or []:
            if t not in MEMORY_TAGS:
                raise ProtocolError(f"tags: unknown tag {t!r} (valid: {list(MEMORY_TAGS)})")


@dataclass
class ResumeMemoryOccupationReqInput(ReleaseMemoryOccupationReqInput):
    pass


@dataclass
class AbortReq:
    rid: str = ""
    abort_all: bool = False


@dataclass
class PauseGenerationReqInput:
    mode: str = field(default="abort", metadata={"choices": ("abort", "retract", "in_place")})


# --- responses (client side) -----------------------------------------------------------------
@dataclass
class GenerateOutput:
    """One completion, typed. `output_token_logprobs[i]` is the log-prob of `output_ids[i]`."""

    output_ids: list[int]
    output_token_logprobs: list[float] | None
    finish_reason: dict | None
    weight_version: str | None
    text: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    meta_info: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, item: dict) -> GenerateOutput:
        if not isinstance(item, dict) or "meta_info" not in item:
            raise ProtocolError(f"generate: malformed response item {str(item)[:200]!r}")
        meta = item["meta_info"]
        lps = meta.get("output_token_logprobs")
        ids = item.get("output_ids")
        if ids is None and lps is not None:
            ids = [int(t[1]) for t in lps]
        return cls(
            output_ids=list(ids or []),
            output_token_logprobs=None if lps is None else [float(t[0]) for t in lps],
            finish_reason=meta.get("finish_reason"),
            weight_version=meta.get("weight_version"),
            text=item.get("text"),
            prompt_tokens=meta.get("prompt_tokens"),
            completion_tokens=meta.get("completion_tokens"),
            meta_info=meta,
        )

    @property
    def finish_type(self) -> str | None:
        return (self.finish_reason or {}).get("type")
