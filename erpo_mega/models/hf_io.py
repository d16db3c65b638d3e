"""Streaming access to HuggingFace safetensors checkpoints, with errors that name the file.

The reader opens shards lazily (`safe_open`) and hands out one tensor at a time, so a
conversion never holds the HF model in memory. The writer buffers tensors up to a shard
size, writes `model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`.
Directory-level atomicity (temp dir + os.replace) is `atomic_output_dir`'s job.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files that travel with the weights (tokenizer, generation defaults, chat template).
HF_ASSET_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "generation_config.json", "chat_template.jinja",
    "chat_template.json",
)


class ConversionError(RuntimeError):
    """A checkpoint is missing, malformed or does not match the model config."""


class HFCheckpointReader:
    """Name -> shard map of an HF safetensors directory; tensors are read one at a time."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise ConversionError(f"{self.dir}: HuggingFace checkpoint directory not found")
        self._handles: dict[Path, object] = {}
        self.where: dict[str, Path] = self._locate()

    def _locate(self) -> dict[str, Path]:
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: not a valid safetensors index ({e})") from None
            where = {}
            for name, fname in weight_map.items():
                path = self.dir / fname
                if not path.is_file():
                    raise ConversionError(f"{path}: shard listed in {INDEX_NAME} (for {name!r}) is missing")
                where[name] = path
            for path in set(where.values()):  # the index must agree with the shards' own headers
                for name in self._open(path).keys():
                    if where.get(name) not in (None, path):
                        raise ConversionError(f"{path}: tensor {name!r} is also mapped to {where[name]}")
                    where.setdefault(name, path)
            return where
        single = self.dir / SINGLE_NAME
        if single.is_file():
            return {name: single for name in self._open(single).keys()}
        shards = sorted(self.dir.glob("*.safetensors"))
        if not shards:
            raise ConversionError(f"{self.dir}: no {INDEX_NAME}, {SINGLE_NAME} or *.safetensors files")
        where = {}
        for path in shards:
            for name in self._open(path).keys():
                where[name] = path
        return where

    def _open(self, path: Path):
        handles = self._handles
        if path not in handles:
            try:
                handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises SafetensorError / OSError for bad headers
                raise ConversionError(f"{path}: cannot read safetensors file (corrupted or truncated?): {e}") from None
        return handles[path]

    def names(self) -> set[str]:
        return set(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        path = self.where[name]
        try:
            return tuple(self._open(path).get_slice(name).get_shape())
        except Exception as e:
            raise ConversionError(f"{path}: cannot read the header of tensor {name!r}: {e}") from None

    def get(self, name: str) -> torch.Tensor:
        path = self.where[name]
        try:
            return self._open(path).get_tensor(name)
        except Exception as e:
            raise ConversionError(f"{path}: cannot read tensor {name!r} (corrupted or truncated?): {e}") from None

    def close(self) -> None:
        self._handles.clear()


def check_file_sizes(paths) -> None:
    """Fail early on truncated shards: the header's data offsets must fit in the file."""
    for path in sorted(set(paths)):
        size = path.stat().st_size
        try:
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
        except (OSError, ValueError) as e:
            raise ConversionError(f"{path}: unreadable safetensors header ({e})") from None
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise ConversionError(f"{path}: file is {size} bytes but its header describes {8 + n + end} "
                                  "(truncated or corrupted shard)")


class ShardedSafetensorsWriter:
    """Accumulate tensors; write shards of at most `max_shard_bytes` (one tensor may exceed it)."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = 2 * 1024**3):
        self.dir = Path(out_dir)
        self.max_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # temporary file name, tensor names
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._buffer:
            return
        tmp_name = f"shard-{len(self._shards):05d}.partial"
        save_file(self._buffer, str(self.dir / tmp_name), metadata={"format": "pt"})
        self._shards.append((tmp_name, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give shards their final names and write the index."""
        self._flush()
        n = len(self._shards)
        weight_map = {}
        files = []
        for k, (tmp_name, names) in enumerate(self._shards):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / tmp_name, self.dir / final)
            files.append(final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return files


def copy_assets(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in HF_ASSET_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


@contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield `OUT.tmp-<pid>`; on success it becomes OUT in one rename, on failure it is deleted.

    An existing OUT is refused unless `overwrite`; then it is replaced only after the new
    directory is complete, so a crash never leaves a half-written OUT.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: output directory already exists (pass overwrite/--force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
