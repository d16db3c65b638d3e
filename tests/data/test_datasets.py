import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from erpo_mega.config import ConfigError, from_dict
from erpo_mega.data.datasets import DataConfig, DataWarning, load_prompts
from erpo_mega.data.types import DataError

MATH_ROWS = [
    {"problem": "What is 1/4+1/4?", "solution": "We add: $\\frac14+\\frac14=\\boxed{\\frac{1}{2}}$."},
    {"problem": "Compute 2^3.", "solution": "First \\boxed{4} is wrong; $2^3=\\boxed{8}$", "answer": "8"},
]
GSM_ROWS = [{"question": "Tom has 3 apples and buys 1,000 more. How many?", "answer": "3+1000=1003\n#### 1,003"}]
DAPO_ROWS = [
    {"prompt": [{"role": "user", "content": "Find x if 2x=6."}], "reward_model": {"ground_truth": "3", "style": "rule"}},
    {"prompt": "What is 6*7?", "answer": 42},
]


def write_jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def cfg(path, source="jsonl", **kw):
    return from_dict(DataConfig, {"source": source, "path": str(path), **kw})


def test_jsonl_math_style(tmp_path):
    res = load_prompts(cfg(write_jsonl(tmp_path / "m.jsonl", MATH_ROWS)))
    assert res.style == "math" and res.skipped == 0
    assert [(i.prompt, i.answer) for i in res.items] == [
        ("What is 1/4+1/4?", "\\frac{1}{2}"), ("Compute 2^3.", "8")]
    assert res.items[1].meta["line"] == 2


def test_jsonl_gsm8k_and_dapo_styles(tmp_path):
    gsm = load_prompts(cfg(write_jsonl(tmp_path / "g.jsonl", GSM_ROWS)))
    assert gsm.style == "gsm8k" and gsm.items[0].answer == "1003"
    dapo = load_prompts(cfg(write_jsonl(tmp_path / "d.jsonl", DAPO_ROWS)))
    assert dapo.style == "dapo"
    assert dapo.items[0].prompt == [{"role": "user", "content": "Find x if 2x=6."}]
    assert dapo.items[0].answer == "3" and dapo.items[1].answer == "42"


@pytest.mark.parametrize("rows,style,answers", [
    (MATH_ROWS, "math", ["\\frac{1}{2}", "8"]),
    (GSM_ROWS, "gsm8k", ["1003"]),
    (DAPO_ROWS[:1], "dapo", ["3"]),
])
def test_parquet_each_style(tmp_path, rows, style, answers):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    res = load_prompts(cfg(path, source="parquet"))
    assert res.style == style and [i.answer for i in res.items] == answers


def test_custom_fields_and_split_placeholder(tmp_path):
    write_jsonl(tmp_path / "q_test.jsonl", [{"q": {"text": "1+1?"}, "gold": "2"}])
    c = cfg(tmp_path / "q_{split}.jsonl", prompt_field="q.text", answer_fields=["gold"], split="test")
    res = load_prompts(c)
    assert res.style == "custom" and (res.items[0].prompt, res.items[0].answer) == ("1+1?", "2")


BAD_LINES = [
    MATH_ROWS[0],                                   # 1 ok
    '{"problem": "broken", ',                       # 2 invalid JSON
    {"solution": "\\boxed{1}"},                     # 3 missing problem
    {"problem": 5, "solution": "\\boxed{1}"},  # 4 wrong type
    {"problem": "p", "solution": "no box here"},    # 5 no extractable answer
    "",                                             # 6 blank line: not a row
    '[1, 2]',                                       # 7 not an object
    {"problem": "p", "solution": "x", "answer": [1]},  # 8 answer wrong type
    MATH_ROWS[1],                                   # 9 ok
]


def test_bad_rows_skipped_with_file_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    with pytest.warns(DataWarning, match="skipped 6 bad row") as rec:
        res = load_prompts(cfg(path, on_bad_row="skip"))
    assert [i.meta["line"] for i in res.items] == [1, 9]
    assert res.skipped == 6
    assert [b.line for b in res.bad_rows] == [2, 3, 4, 5, 7, 8]
    reasons = [str(b) for b in res.bad_rows]
    assert reasons[0].startswith(f"{path}:2: invalid JSON")
    assert reasons[1] == f"{path}:3: missing field 'problem'"
    assert "field 'problem' must be a string or a non-empty list of chat messages, got int" in reasons[2]
    assert "no \\boxed{...} answer" in reasons[3]
    assert "expected a JSON object, got list" in reasons[4]
    assert "field 'answer' must be a string or number, got list" in reasons[5]
    assert f"{path}:2:" in str(rec[0].message)


def test_bad_row_error_mode_raises_at_first(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON"):
        load_prompts(cfg(path, on_bad_row="error"))


def test_bad_parquet_row_names_row(tmp_path):
    path = tmp_path / "g.parquet"
    pq.write_table(pa.Table.from_pylist(GSM_ROWS + [{"question": "q2", "answer": "no marker"}]), path)
    with pytest.raises(DataError, match=rf"{path}:row 2: field 'answer' has no '#### <answer>' line"):
        load_prompts(cfg(path, source="parquet"))
    with pytest.warns(DataWarning):
        res = load_prompts(cfg(path, source="parquet", on_bad_row="skip"))
    assert len(res.items) == 1 and str(res.bad_rows[0]).startswith(f"{path}:row 2")


def test_non_utf8_line_reported(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(json.dumps(GSM_ROWS[0]).encode() + b"\n" + b'{"question": "\xff"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8"):
        load_prompts(cfg(path))


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="cannot open JSONL"):
        load_prompts(cfg(tmp_path / "missing.jsonl"))
    path = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match="cannot tell the dataset style"):
        load_prompts(cfg(path))
    all_bad = write_jsonl(tmp_path / "allbad.jsonl", ["nope"])
    with pytest.raises(DataError, match="no usable rows"), pytest.warns(DataWarning):
        load_prompts(cfg(all_bad, on_bad_row="skip"))


def test_config_errors_name_keys():
    with pytest.raises(ConfigError, match="'path'"):
        from_dict(DataConfig, {"source": "jsonl"})
    with pytest.raises(ConfigError, match="on_bad_row"):
        from_dict(DataConfig, {"on_bad_row": "ignore"})
    with pytest.raises(ConfigError, match="prompt_template"):
        from_dict(DataConfig, {"prompt_template": "no placeholder"})
    with pytest.raises(ConfigError, match="builtin.max_ops"):
        from_dict(DataConfig, {"builtin": {"max_ops": 0}})


def test_builtin_source_sizes():
    c = from_dict(DataConfig, {"builtin_train_size": 30, "builtin_eval_size": 10})
    assert len(load_prompts(c).items) == 30
    test = load_prompts(c, split="test").items
    assert len(test) == 10 and all(i.meta["split"] == "test" for i in test)


def test_bad_chat_message_named(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": [{"role": "robot", "content": "hi"}], "answer": "1"}])
    with pytest.raises(DataError, match=rf"{path}:1: field 'prompt\[0\].role' must be one of"):
        load_prompts(cfg(path))
