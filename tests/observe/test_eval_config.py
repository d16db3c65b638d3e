"""`eval.sets` validation: every mistake stops at start-up with the dotted key and the file named."""

import pytest

from erpo_mega.config import ConfigError
from erpo_mega.run_config import load_run_config


def _load(tmp_path, sets_yaml: str):
    path = tmp_path / "cfg.yaml"
    path.write_text("eval:\n  sets:\n" + sets_yaml)
    return load_run_config(str(path)), path


def test_valid_sets_load_with_defaults(tmp_path):
    cfg, _ = _load(tmp_path, "    aime24: {path: data/aime24.jsonl, samples: 32}\n"
                             "    val: {split: validation, samples: 4, pass_k: [1, 3]}\n")
    a, v = cfg.eval.sets["aime24"], cfg.eval.sets["val"]
    assert (a.samples, a.temperature, a.top_p, a.pass_k, a.max_new_tokens) == (32, 1.0, 1.0, None, None)
    assert v.path is None and v.split == "validation" and v.pass_k == [1, 3]
    assert cfg.eval.entropy is True and load_run_config(None).eval.sets == {}


@pytest.mark.parametrize("sets_yaml, key, msg", [
    ("    a: {samples: 4, temperature: 0}\n", "eval.sets.a.samples", "identical"),
    ("    a: {samples: 4, pass_k: [1, 8]}\n", "eval.sets.a.pass_k", "[8]"),
    ("    a: {samples: 0}\n", "eval.sets.a.samples", ">= 1"),
    ("    a: {path: data/aime.csv}\n", "eval.sets.a.path", ".jsonl or .parquet"),
    ("    a: {sample: 4}\n", "eval.sets.a.sample", "unknown key"),
    ("    a: {top_p: 1.5}\n", "eval.sets.a.top_p", "<= 1"),
    ("    a/b: {samples: 1}\n", "eval.sets.a/b", "set names"),
    ("    a: {style: custom}\n", "eval.sets.a.style", "custom"),
])
def test_bad_sets_name_key_and_file(tmp_path, sets_yaml, key, msg):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, sets_yaml)
    text = str(e.value)
    assert f"'{key}'" in text and msg in text and str(tmp_path / "cfg.yaml") in text, text
