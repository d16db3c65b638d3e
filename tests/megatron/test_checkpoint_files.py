"""Checkpoint directory rules that need no processes: manifest checks and `latest` resolution."""

import json

import pytest

from erpo_mega.megatron.checkpoint import (
    LATEST,
    MANIFEST,
    CheckpointError,
    resolve_checkpoint,
    verify_checkpoint_files,
    write_manifest,
)


def _fake_checkpoint(root, name, payload=b"x" * 100):
    d = root / name
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(payload)
    (d / "train_state.json").write_text("{}")
    write_manifest(d)
    return d


def test_manifest_lists_files_with_sizes(tmp_path):
    d = _fake_checkpoint(tmp_path, "iter_0000001")
    files = json.loads((d / MANIFEST).read_text())["files"]
    assert files == {"__0_0.distcp": 100, "train_state.json": 2}
    verify_checkpoint_files(d)


def test_truncated_file_is_named(tmp_path):
    d = _fake_checkpoint(tmp_path, "iter_0000001")
    (d / "__0_0.distcp").write_bytes(b"x" * 40)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp is truncated or damaged: 40 bytes, expected 100"):
        verify_checkpoint_files(d)


def test_missing_file_and_missing_manifest_are_named(tmp_path):
    d = _fake_checkpoint(tmp_path, "iter_0000001")
    (d / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp is missing"):
        verify_checkpoint_files(d)
    (d / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="erpo_manifest.json is missing"):
        verify_checkpoint_files(d)


def test_interrupted_save_leaves_previous_checkpoint_current(tmp_path):
    # a save of step 2 died before its rename: only iter_0000002.tmp exists, latest is untouched
    _fake_checkpoint(tmp_path, "iter_0000001")
    (tmp_path / LATEST).write_text("iter_0000001\n")
    tmp = tmp_path / "iter_0000002.tmp"
    tmp.mkdir()
    (tmp / "__0_0.distcp").write_bytes(b"partial")
    assert resolve_checkpoint(tmp_path) == tmp_path / "iter_0000001"
    verify_checkpoint_files(resolve_checkpoint(tmp_path))


def test_resolve_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "absent")
    (tmp_path / LATEST).write_text("iter_0000009\n")
    with pytest.raises(CheckpointError, match="points to 'iter_0000009'"):
        resolve_checkpoint(tmp_path)
    (tmp_path / LATEST).unlink()
    with pytest.raises(CheckpointError, match="has no 'latest' file"):
        resolve_checkpoint(tmp_path)
    d = _fake_checkpoint(tmp_path, "iter_0000003")
    assert resolve_checkpoint(d) == d
