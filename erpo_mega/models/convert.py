"""HuggingFace <-> megatron-core checkpoint conversion and the shared checkpoint contract.

A megatron checkpoint here is a megatron-core dist-checkpointing directory (torch_dist
backend) of `{"model": {...ShardedTensors...}}` whose keys are exactly those of
`GPTModel.sharded_state_dict()` (per-layer tensors stacked on a leading layer axis), plus
`erpo_meta.json` describing the architecture. Dist checkpoints store *global* tensors, so
one directory loads at every TP/PP; conversion therefore writes one layout, and `--tp/--pp`
only check that the model can run at that layout.

HF -> megatron streams HF tensors one at a time and holds one (megatron-layout) copy, which
dist-checkpointing needs in full to save. Megatron -> HF loads one checkpoint key at a time
(e.g. every layer's fc1) and writes safetensors shards as they fill, so it holds one key's
tensors plus one shard. Every output directory is
written under `OUT.tmp-<pid>` and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from erpo_mega.config import ConfigError
from erpo_mega.models import hf_tables as T
from erpo_mega.models.builder import padded_vocab_size, unwrap_model
from erpo_mega.models.config import ModelConfig
from erpo_mega.models.hf_io import (
    ConversionError,
    HFCheckpointReader,
    ShardedSafetensorsWriter,
    atomic_output_dir,
    check_file_sizes,
    copy_assets,
)

__all__ = [
    "FORMAT", "META_NAME", "ConversionError", "convert_hf_to_mcore", "convert_mcore_to_hf",
    "load_weights_into", "read_meta", "read_model_config", "write_meta", "compare_model_configs",
    "main_hf_to_mcore", "main_mcore_to_hf",
]

FORMAT = "erpo-mega/mcore-v1"
META_NAME = "erpo_meta.json"
HF_ASSETS_DIR = "hf_assets"  # config.json + tokenizer files of the source HF model
# Fields that must agree between two descriptions of the same weights.
COMPARED_FIELDS = ("arch", "num_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "rms_norm_eps",
                   "tie_word_embeddings", "qkv_bias")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- the checkpoint contract ---------------------------------------------------------------------
def write_meta(ckpt_dir: str | Path, cfg: ModelConfig, source: str, kind: str = "weights",
               extra: dict | None = None) -> None:
    meta = {"format": FORMAT, "model_config": cfg.to_dict(), "source": source, "kind": kind, **(extra or {})}
    path = Path(ckpt_dir) / META_NAME
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)


def read_meta(ckpt_dir: str | Path) -> dict:
    """`erpo_meta.json` of a megatron checkpoint directory, checked for format and completeness."""
    d = Path(ckpt_dir)
    path = d / META_NAME
    if not d.is_dir():
        raise ConversionError(f"{d}: megatron checkpoint directory not found")
    if not path.is_file():
        raise ConversionError(f"{path}: missing; {d} is not an erpo-mega megatron checkpoint")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ConversionError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(meta.get("model_config"), dict):
        raise ConversionError(f"{path}: 'model_config' is missing")
    if not (d / "metadata.json").is_file():
        raise ConversionError(f"{d / 'metadata.json'}: missing; not a complete dist checkpoint")
    return meta


def read_model_config(ckpt_dir: str | Path) -> ModelConfig:
    meta = read_meta(ckpt_dir)
    return ModelConfig.from_dict(meta["model_config"], source=str(Path(ckpt_dir) / META_NAME))


def compare_model_configs(expected: ModelConfig, got: ModelConfig, where: str) -> None:
    """Raise ConfigError naming the first architecture field on which the two disagree."""
    for name in COMPARED_FIELDS:
        a, b = getattr(expected, name), getattr(got, name)
        if isinstance(a, float) or isinstance(b, float):
            same = a is not None and b is not None and abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)))
        else:
            same = a == b
        if not same:
            raise ConfigError(name, f"checkpoint has {a!r} but {where} has {b!r}", where)


@contextmanager
def single_process_group():
    """dist-checkpointing needs torch.distributed; offline tools run as a world of one."""
    import torch.distributed as dist

    from erpo_mega.parallel.cpu_shim import apply_cpu_shim

    apply_cpu_shim()  # megatron's savers call torch.cuda.synchronize(); no-op on GPU machines
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError("offline conversion runs in one process, but torch.distributed is "
                                  f"initialised with world size {dist.get_world_size()}")
        yield
        return
    with tempfile.TemporaryDirectory(prefix="erpo-convert-") as d:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(d, "store"), 1), rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _sharded(bw: T.BoundWeight, tensor: torch.Tensor, num_layers: int):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if bw.layer is None:
        return ShardedTensor.from_rank_offsets(bw.ckpt_key, tensor, replica_id=0)
    return ShardedTensor.from_rank_offsets(bw.ckpt_key, tensor, (0, bw.layer, num_layers), replica_id=0,
                                           prepend_axis_num=1)


def _extra_state_objects(num_layers: int) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {f"{key}.{i}": ShardedObject(key, None, (num_layers,), (i,), replica_id=0)
            for i in range(num_layers) for key in T.LAYER_EXTRA_STATE_KEYS}


def _last_line(e: BaseException) -> str:
    """torch DCP wraps the cause in a multi-page traceback string; its last line says what broke."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr)


# --- HF -> megatron --------------------------------------------------------------------------------
def check_output_apart(out_dir: str | Path, **inputs: str | Path | None) -> None:
    """Refuse an output directory that is, contains or lies inside an input: replacing it
    (`--force`) or writing into it would delete or alter the model being read."""
    out = Path(out_dir).resolve()
    for name, inp in inputs.items():
        if inp is None:
            continue
        src = Path(inp).resolve()
        if out == src:
            why = "is"
        elif out in src.parents:
            why = "contains"
        elif src in out.parents:
            why = "lies inside"
        else:
            continue
        raise ConversionError(f"{out}: the output directory {why} the input {src} (--{name.replace('_', '-')}); "
                              "replacing it would delete the model being converted. Choose an --out outside it")


def _is_ignorable_hf(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")  # buffers some old checkpoints saved


def validate_hf_tensors(reader: HFCheckpointReader, cfg: ModelConfig, bws: list[T.BoundWeight]) -> None:
    """Every expected tensor present with its shape, nothing unexplained left over."""
    expected = {name: shape for bw in bws for name, shape in zip(bw.hf, bw.hf_shapes)}
    have = reader.names()
    missing = sorted(set(expected) - have)
    if missing:
        raise ConversionError(f"{reader.dir}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    extra = sorted(n for n in have - set(expected) if not _is_ignorable_hf(n)
                   and not (n == "lm_head.weight" and cfg.tie_word_embeddings))
    if extra:
        raise ConversionError(f"{reader.dir}: unexpected tensor(s) {extra[:8]}{' ...' if len(extra) > 8 else ''} "
                              f"for a {cfg.arch} model with {cfg.num_layers} layers")
    for name, shape in expected.items():
        got = reader.shape(name)
        if got != tuple(shape):
            raise ConversionError(f"{reader.where[name]}: tensor {name!r} has shape {list(got)}, "
                                  f"the config implies {list(shape)}")
    if cfg.tie_word_embeddings and "lm_head.weight" in have:
        if not torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
            raise ConversionError(f"{reader.where['lm_head.weight']}: config ties word embeddings but "
                                  "lm_head.weight differs from model.embed_tokens.weight")


def convert_hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1,
                        dtype: str | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Write the megatron dist checkpoint of an HF Qwen2/Llama directory; returns OUT.

    `tp`/`pp` are validated (heads, groups, FFN, vocab and layers must split evenly); the
    stored global tensors are the same for every layout and load at any TP/PP.
    """
    from megatron.core import dist_checkpointing

    hf_dir = Path(hf_dir)
    check_output_apart(out_dir, hf_dir=hf_dir)
    cfg = ModelConfig.from_hf_dir(hf_dir)
    T.validate_parallel_layout(cfg, tp, pp)
    cast = _DTYPES[dtype] if dtype else None
    reader = HFCheckpointReader(hf_dir)
    check_file_sizes(reader.where.values())
    bws = T.bound_weights(cfg)
    validate_hf_tensors(reader, cfg, bws)

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp, single_process_group():
        state = {}
        with _progress(len(bws), "hf -> mcore", progress) as bar:
            for bw in bws:
                tensors = [reader.get(n) for n in bw.hf]
                if cast is not None:
                    tensors = [t.to(cast) for t in tensors]
                state[bw.mcore] = _sharded(bw, T.hf_to_mcore(bw, tensors, cfg), cfg.num_layers)
                del tensors
                bar.update(1)
        reader.close()
        state.update(_extra_state_objects(cfg.num_layers))
        dist_checkpointing.save({"model": state}, str(tmp))
        del state
        assets = tmp / HF_ASSETS_DIR
        assets.mkdir()
        (assets / "config.json").write_text((hf_dir / "config.json").read_text())
        copy_assets(hf_dir, assets)
        write_meta(tmp, cfg, source=str(hf_dir.resolve()),
                   extra={"validated_layout": {"tp": tp, "pp": pp},
                          "padded_vocab_size": padded_vocab_size(cfg.vocab_size)})
    return Path(out_dir)


# --- megatron -> HF ---------------------------------------------------------------------------------
def _check_mcore_tensors(ckpt_dir: Path, cfg: ModelConfig, bws: list[T.BoundWeight]) -> dict:
    """Compare the checkpoint's tensor metadata with the table; return key -> dtype."""
    from megatron.core import dist_checkpointing

    try:
        md = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    except (Exception, CheckpointException) as e:
        raise ConversionError(f"{ckpt_dir}: cannot read dist-checkpoint metadata: {_last_line(e)}") from None
    expected = {}
    for bw in bws:
        shape = (cfg.num_layers, *bw.mcore_shape) if bw.layer is not None else bw.mcore_shape
        expected[bw.ckpt_key] = tuple(shape)
    for key, shape in expected.items():
        if key not in md:
            raise ConversionError(f"{ckpt_dir}: tensor {key!r} is missing from the checkpoint")
        got = tuple(md[key].global_shape)
        if got != shape:
            raise ConversionError(f"{ckpt_dir}: tensor {key!r} has global shape {list(got)}, "
                                  f"{META_NAME} implies {list(shape)}")
    model_prefixes = ("embedding.", "decoder.", "output_layer.")
    extra = sorted(k for k in md if k.startswith(model_prefixes) and k not in expected
                   and not k.endswith("_extra_state"))
    if extra:
        raise ConversionError(f"{ckpt_dir}: unexpected tensor(s) {extra[:8]} for the model in {META_NAME}")
    return {key: md[key].dtype for key in expected}


def _load_stacked(ckpt_dir: Path, bws: list[T.BoundWeight], dtype: torch.dtype, num_layers: int) -> torch.Tensor:
    """One checkpoint key for all layers it covers (a [L, ...] tensor for per-layer keys).

    Reading a single layer's slice does not work in a world of one (megatron places the
    other slices on "another" rank, which is this rank again), so the unit is one key.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    bw = bws[0]
    shape = (num_layers, *bw.mcore_shape) if bw.layer is not None else bw.mcore_shape
    request = {"t": ShardedTensor.from_rank_offsets(bw.ckpt_key, torch.empty(shape, dtype=dtype), replica_id=0)}
    try:
        return dist_checkpointing.load(request, str(ckpt_dir))["t"]
    except (Exception, CheckpointException) as e:  # torch DCP's error is a BaseException
        raise ConversionError(f"{ckpt_dir}: failed to read tensor {bw.ckpt_key!r}: {_last_line(e)}") from None


def convert_mcore_to_hf(mcore_dir: str | Path, out_dir: str | Path, hf_config_dir: str | Path | None = None,
                        dtype: str | None = None, max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False,
                        progress: bool = True) -> Path:
    """Write an HF directory (sharded safetensors + index, config.json, tokenizer files); returns OUT.

    config.json comes from `hf_config_dir` (after checking it describes the same model) or
    from the HF files stored with the checkpoint, else it is generated from the model config.
    """
    mcore_dir = Path(mcore_dir)
    check_output_apart(out_dir, mcore_dir=mcore_dir, hf_config=hf_config_dir)
    cfg = read_model_config(mcore_dir)
    cast = _DTYPES[dtype] if dtype else None
    assets_src = mcore_dir / HF_ASSETS_DIR
    if hf_config_dir is not None:
        hf_config_dir = Path(hf_config_dir)
        compare_model_configs(cfg, ModelConfig.from_hf_dir(hf_config_dir), str(hf_config_dir / "config.json"))
        assets_src = hf_config_dir
    if (assets_src / "config.json").is_file():
        hf_config = json.loads((assets_src / "config.json").read_text())
    else:
        hf_config = cfg.to_hf_dict()
    bws = T.bound_weights(cfg)

    with single_process_group():
        dtypes = _check_mcore_tensors(mcore_dir, cfg, bws)
        by_key: dict[str, list[T.BoundWeight]] = {}
        for bw in bws:
            by_key.setdefault(bw.ckpt_key, []).append(bw)
        with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
            out_dtype = None
            with _progress(len(bws), "mcore -> hf", progress) as bar:
                for key, group in by_key.items():
                    stacked = _load_stacked(mcore_dir, group, dtypes[key], cfg.num_layers)
                    for bw in group:
                        tensor = stacked[bw.layer] if bw.layer is not None else stacked
                        for name, t in zip(bw.hf, T.mcore_to_hf(bw, tensor, cfg)):
                            t = t.to(cast) if cast is not None else t
                            out_dtype = t.dtype
                            writer.add(name, t)
                        bar.update(1)
                    del stacked, tensor
            writer.close()
            hf_config["torch_dtype"] = str(out_dtype).removeprefix("torch.")
            hf_config.pop("dtype", None)
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            copy_assets(assets_src, tmp)
    return Path(out_dir)


# --- loading into a live model -------------------------------------------------------------------
def _check_model_matches(chunk, cfg: ModelConfig, where: str) -> None:
    tc = chunk.config
    pairs = [("num_layers", tc.num_layers, cfg.num_layers), ("hidden_size", tc.hidden_size, cfg.hidden_size),
             ("intermediate_size", tc.ffn_hidden_size, cfg.intermediate_size),
             ("num_attention_heads", tc.num_attention_heads, cfg.num_attention_heads),
             ("num_key_value_heads", tc.num_query_groups, cfg.num_key_value_heads),
             ("head_dim", tc.kv_channels, cfg.kv_channels), ("qkv_bias", tc.add_qkv_bias, bool(cfg.qkv_bias)),
             ("vocab_size", chunk.vocab_size, padded_vocab_size(cfg.vocab_size)),
             ("tie_word_embeddings", chunk.share_embeddings_and_output_weights, cfg.tie_word_embeddings)]
    for name, model_value, ckpt_value in pairs:
        if model_value != ckpt_value:
            raise ConfigError(name, f"checkpoint has {ckpt_value!r} but the model was built with {model_value!r}",
                              where)


def load_weights_into(model_chunks: torch.nn.Module | Iterable[torch.nn.Module], ckpt_dir: str | Path,
                      cfg: ModelConfig | None = None) -> ModelConfig:
    """Load a weights checkpoint into this rank's GPTModel chunk(s) at whatever TP/PP they run.

    Collective: every rank of the job calls it. `_extra_state` entries are skipped (nothing
    a weights checkpoint needs; TE's differ from the local spec's). Returns the checkpoint's
    model config after checking it against `cfg` and against the built model.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    ckpt_cfg = read_model_config(ckpt_dir)
    where = str(ckpt_dir / META_NAME)
    if cfg is not None:
        compare_model_configs(ckpt_cfg, cfg, "the model config")
    chunks = [unwrap_model(m) for m in ([model_chunks] if isinstance(model_chunks, torch.nn.Module) else model_chunks)]
    request = {}
    for k, chunk in enumerate(chunks):
        _check_model_matches(chunk, ckpt_cfg, where)
        sd = chunk.sharded_state_dict()
        request[f"model{k}" if len(chunks) > 1 else "model"] = {
            name: v for name, v in sd.items() if not name.endswith("_extra_state")}
    try:
        loaded = dist_checkpointing.load(request, str(ckpt_dir))
    except (Exception, CheckpointException) as e:
        raise ConversionError(f"{ckpt_dir}: loading weights failed: {_last_line(e)}") from e
    for k, chunk in enumerate(chunks):
        state = loaded[f"model{k}" if len(chunks) > 1 else "model"]
        result = chunk.load_state_dict(state, strict=False)
        missing = [n for n in result.missing_keys if not n.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ConversionError(f"{ckpt_dir}: loading left parameters unset {missing[:8]} "
                                  f"or unexpected {list(result.unexpected_keys)[:8]}")
    return ckpt_cfg


# --- command lines -------------------------------------------------------------------------------
def _run_cli(fn, args) -> int:
    try:
        out = fn(args)
    except (ConversionError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def main_hf_to_mcore(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="convert_hf_to_mcore", description=(
        "Convert a HuggingFace Qwen2/Llama directory into a megatron-core dist checkpoint. "
        "The checkpoint stores global tensors and loads at any TP/PP; --tp/--pp check that the "
        "model can be split that way."))
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast weights (default: keep)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    return _run_cli(lambda a: convert_hf_to_mcore(a.hf_dir, a.out, a.tp, a.pp, a.dtype, a.force,
                                                  not a.no_progress), a)


def main_mcore_to_hf(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="convert_mcore_to_hf", description=(
        "Convert an erpo-mega megatron-core checkpoint into a HuggingFace directory "
        "(sharded safetensors + index, config.json, tokenizer files)."))
    p.add_argument("--mcore-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--hf-config", default=None, help="HF directory whose config.json/tokenizer to use (checked)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast weights (default: keep)")
    p.add_argument("--max-shard-gb", type=float, default=2.0)
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    return _run_cli(lambda a: convert_mcore_to_hf(a.mcore_dir, a.out, a.hf_config, a.dtype,
                                                  int(a.max_shard_gb * 1024**3), a.force, not a.no_progress), a)
