"""Offline conversion in one process: HF -> megatron -> HF is bit-exact and loads in transformers;
bad input fails with an error naming the tensor or file and leaves no output behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from erpo_mega.config import ConfigError
from erpo_mega.models.convert import (
    ConversionError,
    convert_hf_to_mcore,
    convert_mcore_to_hf,
    main_hf_to_mcore,
    main_mcore_to_hf,
    read_meta,
    read_model_config,
)
from erpo_mega.models.hf_io import INDEX_NAME
from tests.models.tiny_hf import hf_logits, sample_tokens, save_hf_model


def _tensors(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _leftovers(parent, name) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(name))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def hf_dirs(root):
    dirs = {arch: save_hf_model(arch, root / f"{arch}_hf", seed=3) for arch in ("qwen2", "llama")}
    (dirs["qwen2"] / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    return dirs


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_round_trip_is_bit_exact_and_loads_in_transformers(root, hf_dirs, arch):
    hf_dir = hf_dirs[arch]
    mcore = root / f"{arch}_mcore"
    back = root / f"{arch}_back"
    assert main_hf_to_mcore(["--hf-dir", str(hf_dir), "--out", str(mcore), "--tp", "2", "--pp", "2",
                             "--no-progress"]) == 0
    meta = read_meta(mcore)
    assert meta["format"] == "erpo-mega/mcore-v1" and meta["kind"] == "weights"
    assert meta["validated_layout"] == {"tp": 2, "pp": 2}
    cfg = read_model_config(mcore)
    assert cfg.arch == arch and cfg.vocab_size == 200 and cfg.num_layers == 4
    assert main_mcore_to_hf(["--mcore-dir", str(mcore), "--out", str(back), "--hf-config", str(hf_dir),
                             "--max-shard-gb", "0.0001", "--no-progress"]) == 0

    original, exported = _tensors(hf_dir), _tensors(back)
    assert set(original) == set(exported)
    for name, t in original.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name
    index = json.loads((back / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded at the requested size
    assert set(index["weight_map"]) == set(original)
    if arch == "qwen2":
        assert (back / "tokenizer_config.json").read_text() == '{"model_max_length": 128}\n'

    tokens = sample_tokens(seed=5)
    torch.testing.assert_close(hf_logits(back, tokens), hf_logits(hf_dir, tokens), rtol=0, atol=0)


def test_config_json_generated_without_hf_config(root, hf_dirs):
    mcore = root / "gen_mcore"
    convert_hf_to_mcore(hf_dirs["llama"], mcore, progress=False)
    shutil.rmtree(mcore / "hf_assets")  # as a trainer checkpoint would be: no HF files alongside
    out = convert_mcore_to_hf(mcore, root / "gen_hf", progress=False)
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "llama" and written["tie_word_embeddings"] is True
    assert written["rope_theta"] == 500000.0
    tokens = sample_tokens(seed=7)
    torch.testing.assert_close(hf_logits(out, tokens), hf_logits(hf_dirs["llama"], tokens), rtol=0, atol=0)


def test_mismatched_hf_config_is_refused(root, hf_dirs):
    mcore = root / "qwen2_mismatch_mcore"
    convert_hf_to_mcore(hf_dirs["qwen2"], mcore, progress=False)
    other = root / "other_cfg"
    other.mkdir()
    hf = json.loads((hf_dirs["qwen2"] / "config.json").read_text())
    hf["num_hidden_layers"] = 3
    (other / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="num_layers"):
        convert_mcore_to_hf(mcore, root / "mismatch_out", hf_config_dir=other, progress=False)
    assert _leftovers(root, "mismatch_out") == []
    # and a model built for another config refuses the checkpoint on the HF side too
    hf["num_hidden_layers"], hf["num_key_value_heads"] = 4, 4
    (other / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        convert_mcore_to_hf(mcore, root / "mismatch_out", hf_config_dir=other, progress=False)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named_and_nothing_is_written(root, hf_dirs):
    broken = _copy(hf_dirs["qwen2"], root / "missing_hf")
    index = json.loads((broken / INDEX_NAME).read_text())
    victim = "model.layers.2.mlp.up_proj.weight"
    shard = broken / index["weight_map"][victim]
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard, metadata={"format": "pt"})
    del index["weight_map"][victim]
    (broken / INDEX_NAME).write_text(json.dumps(index))
    assert main_hf_to_mcore(["--hf-dir", str(broken), "--out", str(root / "missing_out"), "--no-progress"]) == 2
    with pytest.raises(ConversionError, match=victim.replace(".", r"\.")):
        convert_hf_to_mcore(broken, root / "missing_out", progress=False)
    assert _leftovers(root, "missing_out") == []


def test_misshaped_and_extra_tensors_are_named(root, hf_dirs):
    broken = _copy(hf_dirs["llama"], root / "shape_hf")
    index = json.loads((broken / INDEX_NAME).read_text())
    victim = "model.layers.1.self_attn.k_proj.weight"
    shard = broken / index["weight_map"][victim]
    tensors = load_file(shard)
    tensors[victim] = torch.zeros(8, 64)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"k_proj\.weight.*\[8, 64\].*\[16, 64\]"):
        convert_hf_to_mcore(broken, root / "shape_out", progress=False)
    tensors[victim] = torch.zeros(16, 64)
    tensors["model.layers.1.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"]["model.layers.1.self_attn.o_proj.bias"] = shard.name
    (broken / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"unexpected.*o_proj\.bias"):
        convert_hf_to_mcore(broken, root / "shape_out", progress=False)
    assert _leftovers(root, "shape_out") == []


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupted_shard_is_named(root, hf_dirs, damage):
    broken = _copy(hf_dirs["qwen2"], root / f"{damage}_hf")
    shard = sorted(broken.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\xff" * 16 + data[16:])
    with pytest.raises(ConversionError, match=shard.name):
        convert_hf_to_mcore(broken, root / f"{damage}_out", progress=False)
    assert _leftovers(root, f"{damage}_out") == []


def test_damaged_megatron_checkpoint_and_existing_output(root, hf_dirs):
    mcore = root / "dmg_mcore"
    convert_hf_to_mcore(hf_dirs["qwen2"], mcore, progress=False)
    with pytest.raises(ConversionError, match="already exists"):
        convert_hf_to_mcore(hf_dirs["qwen2"], mcore, progress=False)
    assert read_meta(mcore)  # the refused run left the good checkpoint alone
    no_meta = _copy(mcore, root / "dmg_nometa")
    (no_meta / "erpo_meta.json").unlink()
    with pytest.raises(ConversionError, match="erpo_meta.json"):
        convert_mcore_to_hf(no_meta, root / "dmg_out", progress=False)
    lying = _copy(mcore, root / "dmg_lying")
    meta = json.loads((lying / "erpo_meta.json").read_text())
    meta["model_config"]["intermediate_size"] = 64
    (lying / "erpo_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConversionError, match=r"linear_fc1\.weight.*global shape"):
        convert_mcore_to_hf(lying, root / "dmg_out", progress=False)
    truncated = _copy(mcore, root / "dmg_trunc")
    data_file = max(truncated.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data_file.write_bytes(data_file.read_bytes()[:1000])
    with pytest.raises(ConversionError, match="failed to read"):
        convert_mcore_to_hf(truncated, root / "dmg_out", progress=False)
    assert _leftovers(root, "dmg_out") == []


def test_invalid_parallel_layout_is_refused(root, hf_dirs):
    with pytest.raises(ConfigError, match="num_attention_heads"):
        convert_hf_to_mcore(hf_dirs["qwen2"], root / "tp3_out", tp=3, progress=False)
    assert main_hf_to_mcore(["--hf-dir", str(hf_dirs["qwen2"]), "--out", str(root / "tp3_out"),
                             "--pp", "3", "--no-progress"]) == 2
    assert _leftovers(root, "tp3_out") == []
