"""Typed YAML config: every error names the key and the file; examples stay valid."""

from pathlib import Path

import pytest

from erpo_mega.config import ConfigError, parse_overrides
from erpo_mega.run_config import RunConfig, load_run_config

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, key, fragment", [
    ("train:\n  optim:\n    lrr: 1.0\n", "train.optim.lrr", "unknown key"),
    ("rollout:\n  temperature: hot\n", "rollout.temperature", "expected a number"),
    ("rollout:\n  samples_per_prompt: 1\n", "rollout.samples_per_prompt", "must be >= 2"),
    ("algo:\n  erpo:\n    anchor: sideways\n", "algo.erpo.anchor", "must be one of"),
    ("train:\n  steps: 2.5\n", "train.steps", "expected an integer"),
    ("data:\n  builtin:\n    min_ops: 5\n    max_ops: 3\n", "data.builtin.min_ops", "must be <= max_ops"),
    ("model:\n  arch: null\n", "model.init_from", "model.arch"),
    ("tensorboard: 1\n", "tensorboard", "expected true/false"),
])
def test_bad_values_name_key_and_file(tmp_path, text, key, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_run_config(str(path))
    assert err.value.key == key
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_invalid_yaml_and_missing_file_name_the_file(tmp_path):
    path = _write(tmp_path, "train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML") as err:
        load_run_config(str(path))
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(str(tmp_path / "nope.yaml"))


def test_overrides_are_typed_and_validated(tmp_path):
    path = _write(tmp_path, "train:\n  steps: 5\n")
    cfg = load_run_config(str(path), ["train.steps=7", "algo.erpo.beta=0.25", "rollout.engine_urls=[\"http://a:1\"]",
                                      "rollout.engine=external"])
    assert (cfg.train.steps, cfg.algo.erpo.beta, cfg.rollout.engine_urls) == (7, 0.25, ["http://a:1"])
    with pytest.raises(ConfigError, match="algo.erpo.beta") as err:
        load_run_config(str(path), ["algo.erpo.beta=-1"])
    assert "command-line overrides" in str(err.value)
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["train.steps"])


def test_external_engine_needs_urls():
    with pytest.raises(ConfigError, match="rollout.engine_urls"):
        load_run_config(None, ["rollout.engine=external"])


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "erpo_qwen2.5_7b.yaml"])
def test_shipped_examples_load(name):
    cfg = load_run_config(str(REPO / "examples" / name))
    assert isinstance(cfg, RunConfig)
