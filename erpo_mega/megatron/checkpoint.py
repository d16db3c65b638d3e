"""Training checkpoints with megatron dist-checkpointing: resumable at any TP/PP/DP layout.

Layout on disk (`root/`):
    latest                     "iter_0000042" (replaced atomically after a save completes)
    iter_0000042/              megatron dist checkpoint of {"model", "optimizer", "rng"}
        train_state.json       step, scheduler, the trainer's `extra`, layout, format version
        erpo_manifest.json     every file with its byte size; written last
Model tensors sit under the key "model" (as in converted HuggingFace checkpoints), so a
converted model directory is a valid `load_weights_only` source.

Crash safety: a save writes `iter_N.tmp/`, then renames it to `iter_N/`, then rewrites
`latest`; a crash at any point leaves the previous `latest` pointing to a complete
checkpoint. Loading checks the manifest first, so a missing or truncated file is reported
by name instead of failing deep inside torch.distributed.checkpoint.

Loading the optimizer state (both formats, see OPTIM_FORMATS) needs three fixes for megatron-core
0.16.1's torch-AdamW path (see `_prepare_optimizer_for_load` / `_unshare_adam_steps`).
"""

from __future__ import annotations

import json
import os
import shutil
import types
from pathlib import Path

import torch
import torch.distributed as dist

FORMAT_VERSION = 1
LATEST = "latest"
MANIFEST = "erpo_manifest.json"
TRAIN_STATE = "train_state.json"
# Optimizer-state formats of megatron's distributed optimizer. "sharded" (routine saves):
# every rank writes its own DP shard of the flat buffers, no gathering; it reloads at any DP
# size but only at the saved TP/PP. "reshardable": the state is gathered into per-parameter
# (model-space) tensors on every DP rank before writing (~ the model-parallel optimizer state
# per rank: about 45 GB at 7B TP2), and reloads at any TP/PP/DP. `erpo-mega-reshard`
# (megatron/reshard.py) turns a sharded checkpoint into a reshardable one.
OPTIM_FORMATS = {"sharded": "dp_reshardable", "reshardable": "fully_reshardable"}
DEFAULT_OPTIM_FORMAT = "sharded"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or incompatible; the message names the file."""


def iter_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    """Rank 0 alone writes train_state/manifest and renames (disk syncs can be slow on shared
    file systems): wait for it on the CPU wait group, not a default-group collective."""
    if dist.is_initialized():
        from erpo_mega.parallel.dist import wait_group

        dist.barrier(group=wait_group())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- manifest ---------------------


def write_manifest(ckpt_dir: Path) -> None:
    files = {str(p.relative_to(ckpt_dir)): p.stat().st_size
             for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
    _atomic_write_text(ckpt_dir / MANIFEST, json.dumps({"format": FORMAT_VERSION, "files": files}, indent=1))


def verify_checkpoint_files(ckpt_dir: str | Path) -> None:
    """Raise CheckpointError naming the first missing or truncated file of a checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    manifest = ckpt_dir / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{manifest} is missing: {ckpt_dir} is not a complete erpo-mega checkpoint "
                              "(interrupted save?)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest} is unreadable: {e}") from None
    for name, size in files.items():
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint file {path} is truncated or damaged: {actual} bytes, "
                                  f"expected {size}")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint root (with `latest`) or an `iter_N` directory -> the iter directory."""
    path = Path(path)
    latest = path / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        target = path / name
        if not name or not target.is_dir():
            raise CheckpointError(f"{latest} points to {name!r}, which is not a directory under {path}")
        return target
    if (path / MANIFEST).is_file() or (path / TRAIN_STATE).is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    raise CheckpointError(f"{path} has no '{LATEST}' file and is not a checkpoint directory")


# ---------------------------------------------------------------- sharded state ----------------


def _model_sharded_state(model_chunks) -> dict:
    if len(model_chunks) != 1:
        raise NotImplementedError("virtual pipeline stages (several model chunks per rank) are not supported")
    return model_chunks[0].sharded_state_dict()


def _rng_sharded_object():
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    return ShardedObject("rng_state", state, (pp, tp),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                         replica_id=ps.get_data_parallel_rank())


def _set_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _prepare_optimizer_for_load(optimizer) -> None:
    """Fix 1: a fresh torch Adam has no state, and megatron 0.16.1's sharded_state_dict for
    loading asserts on that. Give every parameter zero moments and step 0 (overwritten by
    the load)."""
    for opt in _inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if "step" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float32)


@torch.no_grad()
def _copy_only_present_states(dist_opt, model_param, tensors) -> None:
    """Fix 2: megatron 0.16.1 copies every state key the live optimizer has ("step"
    included) from the loaded tensors, which never carry "step" (it travels in the param
    groups), so loading raises KeyError('step'). Copy the keys that were loaded."""
    group_index, group_order = dist_opt.model_param_group_index_map[model_param]
    main_param = dist_opt.optimizer.param_groups[group_index]["params"][group_order]
    dst = {"param": main_param, **dist_opt.optimizer.state[main_param]}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor) or key == "step":
            # `padding` is bookkeeping of the sharded format; its per-parameter `step` is not
            # read from disk (it would carry the live optimizer's count): the step travels in
            # the param groups, which megatron's load_state_dict has already applied.
            continue
        if key not in dst:
            raise CheckpointError(f"optimizer state '{key}' in the checkpoint has no counterpart here")
        dst[key].copy_(value)


def _patch_state_copy(optimizer) -> None:
    for opt in _inner_optimizers(optimizer):
        if not hasattr(opt, "_set_main_param_and_optimizer_states"):
            continue
        if getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            continue  # that path stores states differently and is not affected
        opt._set_main_param_and_optimizer_states = types.MethodType(_copy_only_present_states, opt)


def _unshare_adam_steps(optimizer) -> None:
    """Fix 3: after loading, megatron 0.16.1 hands every parameter the *same* `step` tensor;
    torch Adam increments it in place once per parameter, so bias correction runs away.
    Give each parameter its own copy."""
    for opt in _inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for st in inner.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].detach().clone()


def _build_state(modules, is_loading: bool, with_optimizer: bool, with_rng: bool,
                 optim_format: str = DEFAULT_OPTIM_FORMAT) -> dict:
    model_sd = _model_sharded_state(modules.unwrapped())
    state = {"model": model_sd}
    if with_optimizer:
        if is_loading:
            _prepare_optimizer_for_load(modules.optimizer)
            _patch_state_copy(modules.optimizer)
        state["optimizer"] = modules.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                                  metadata=_optim_metadata(optim_format))
    if with_rng:
        state["rng"] = _rng_sharded_object()
    return state


def _optim_metadata(optim_format: str) -> dict:
    if optim_format not in OPTIM_FORMATS:
        raise ValueError(f"optim_format must be one of {sorted(OPTIM_FORMATS)}, got {optim_format!r}")
    return {"distrib_optim_sharding_type": OPTIM_FORMATS[optim_format]}


# ---------------------------------------------------------------- save / load ------------------


def save_checkpoint(root: str | Path, modules, step: int, extra: dict | None = None,
                    write_extra_files=None, optim_format: str = DEFAULT_OPTIM_FORMAT) -> Path:
    """Save model, optimizer, RNG, scheduler, step and `extra` (JSON) as `root/iter_{step}`.

    Collective: every rank calls it. Returns the final checkpoint directory.
    `write_extra_files(tmp_dir)` (rank 0) adds files before the directory is published, e.g.
    the `erpo_meta.json` that makes a training checkpoint convertible to HF.
    `optim_format`: "sharded" (default, no gathering) or "reshardable" (see OPTIM_FORMATS).
    """
    from megatron.core import dist_checkpointing

    _optim_metadata(optim_format)  # validate before any rank writes
    root = Path(root)
    extra = {} if extra is None else extra
    try:
        extra_json = json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra: must be JSON-serialisable ({e})") from None
    final = root / iter_dir_name(step)
    tmp = root / (iter_dir_name(step) + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # leftovers of an interrupted save
        tmp.mkdir()
    _barrier()
    state = _build_state(modules, is_loading=False, with_optimizer=True, with_rng=True, optim_format=optim_format)
    try:
        dist_checkpointing.save(state, str(tmp))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # torch's CheckpointException derives from BaseException
        _raise_if_disk_full(e, root, tmp)
        raise
    _barrier()
    if _rank() == 0:
        try:
            _publish(root, tmp, final, step, modules, extra_json, write_extra_files, optim_format)
        except OSError as e:
            _raise_if_disk_full(e, root, tmp)
            raise
    _barrier()
    return final


def _publish(root: Path, tmp: Path, final: Path, step: int, modules, extra_json: str, write_extra_files,
             optim_format: str = DEFAULT_OPTIM_FORMAT) -> None:
    """Rank 0: train state, manifest, rename `tmp` to `final`, then point `latest` at it."""
    train_state = {"format": FORMAT_VERSION, "step": int(step), "layout": _layout(), "optimizer_format": optim_format,
                   "bf16": bool(getattr(modules, "bf16", False)),
                   "scheduler": modules.scheduler.state_dict(), "extra": json.loads(extra_json)}
    _atomic_write_text(tmp / TRAIN_STATE, json.dumps(train_state, indent=1))
    if write_extra_files is not None:
        write_extra_files(tmp)
    write_manifest(tmp)
    if final.exists():  # re-saving a step: keep the old one until the new one is in place
        old = root / (iter_dir_name(step) + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    _atomic_write_text(root / LATEST, final.name + "\n")


# Below this many free bytes a failed write is taken to be a full disk: torch's writers
# often report ENOSPC only as "unexpected pos 704 vs 598" (a short write), with no errno.
_DISK_FULL_SLACK = 16 * 2**20


def _raise_if_disk_full(e: BaseException, root: Path, tmp: Path) -> None:
    """Turn a save that failed for lack of space (ENOSPC, or a quota: EDQUOT) into a
    CheckpointError naming the file system and the checkpoint; delete the partial directory
    (it frees space and is unusable). The previous checkpoint is left as it was."""
    import errno as errno_mod

    codes = {errno_mod.ENOSPC, getattr(errno_mod, "EDQUOT", -1)}
    chain, x = [], e
    while x is not None and len(chain) < 10:
        chain.append(x)
        x = x.__cause__ or x.__context__
    by_errno = any(getattr(x, "errno", None) in codes for x in chain)
    text = " ".join(str(x) for x in chain)
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    if not (by_errno or "No space left" in text or "Disk quota" in text
            or (free is not None and free < _DISK_FULL_SLACK)):
        return
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    latest = root / LATEST
    prev = latest.read_text().strip() if latest.is_file() else None
    kept = f"the previous checkpoint {root / prev} is intact" if prev else "no earlier checkpoint exists"
    room = f"{free} bytes free" if free is not None else "free space unknown"
    raise CheckpointError(f"no space left on device (ENOSPC) while saving checkpoint {tmp} ({room} on the "
                          f"file system of {root}); the partial checkpoint was removed and {kept}. Free space "
                          f"or point run_dir elsewhere, then --resume") from None


def read_train_state(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported format {state.get('format')!r} (expected {FORMAT_VERSION})")
    return state


def _dist_load(state: dict, ckpt_dir: Path) -> dict:
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load(state, str(ckpt_dir))
    except CheckpointError:
        raise
    except Exception as e:  # name the directory; the manifest check already vetted each file
        raise CheckpointError(f"loading {ckpt_dir} failed: {type(e).__name__}: {e}") from e


def load_checkpoint(path: str | Path, modules, load_optimizer: bool = True) -> dict:
    """Restore a checkpoint saved at any TP/PP/DP into `modules`; returns its train state
    (`step`, `extra`, `layout`, ...). RNG streams are restored only at the saved TP/PP layout
    (they are per model-parallel rank); elsewhere the seeds from initialisation stay."""
    ckpt_dir = resolve_checkpoint(path)
    verify_checkpoint_files(ckpt_dir)
    train_state = read_train_state(ckpt_dir)
    here = _layout()
    saved = train_state["layout"]
    same_mp = saved["tp"] == here["tp"] and saved["pp"] == here["pp"]
    optim_format = train_state.get("optimizer_format", "reshardable")  # older checkpoints: reshardable
    if optim_format not in OPTIM_FORMATS:
        raise CheckpointError(f"{ckpt_dir / TRAIN_STATE}: unknown optimizer_format {optim_format!r}")
    if load_optimizer and optim_format == "sharded" and not same_mp:
        raise CheckpointError(
            f"{ckpt_dir} was saved at tp={saved['tp']} pp={saved['pp']} with the sharded optimizer format, "
            f"which loads only at that TP/PP (here tp={here['tp']} pp={here['pp']}). Convert it once, at the "
            f"saved layout: torchrun --nproc-per-node={saved['tp'] * saved['pp'] * saved.get('dp', 1)} -m "
            f"erpo_mega.megatron.reshard {ckpt_dir} OUT_DIR  (or load the weights only)")
    state = _build_state(modules, is_loading=True, with_optimizer=load_optimizer, with_rng=same_mp,
                         optim_format=optim_format)
    loaded = _dist_load(state, ckpt_dir)
    unwrapped = modules.unwrapped()
    unwrapped[0].load_state_dict(loaded["model"], strict=True)
    if load_optimizer:
        modules.optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(modules.optimizer)
        modules.scheduler.load_state_dict(train_state["scheduler"])
    if same_mp:
        _set_rng(loaded["rng"])
    return train_state


def load_weights_only(path: str | Path, model_chunks) -> None:
    """Load only the "model" tensors (a converted HuggingFace checkpoint or a training
    checkpoint) into unwrapped GPTModel stages at this rank's layout."""
    path = Path(path)
    ckpt_dir = path
    if (path / LATEST).is_file():
        ckpt_dir = resolve_checkpoint(path)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    if (ckpt_dir / MANIFEST).is_file():
        verify_checkpoint_files(ckpt_dir)
    elif not (ckpt_dir / "metadata.json").is_file():
        raise CheckpointError(f"{ckpt_dir / 'metadata.json'} is missing: not a megatron dist checkpoint")
    chunks = [getattr(c, "module", c) for c in model_chunks]
    loaded = _dist_load({"model": _model_sharded_state(chunks)}, ckpt_dir)
    chunks[0].load_state_dict(loaded["model"], strict=True)
