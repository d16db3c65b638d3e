"""`erpo-mega prepare-data` on small fixture files shaped like each public source (no downloads).

Each fixture copies the source's real layout (column names, nesting, file type); the output must
load through the project's own loader with the expected answers, and those answers must be what
the math-verify reward accepts.
"""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from erpo_mega.data.datasets import DataConfig, load_prompts
from erpo_mega.data.prepare import normalize_answer, prepare
from erpo_mega.data.prepare_sources import strip_dapo_instruction
from erpo_mega.data.types import DataError
from erpo_mega.rewards.math_verify_reward import math_verify_reward

REPO = Path(__file__).resolve().parents[2]
DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the "
               "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def _jsonl(path: Path, rows: list, raw_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(raw_lines))
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _loaded(out: Path) -> list[tuple[str, str]]:
    source = "parquet" if out.suffix == ".parquet" else "jsonl"
    items = load_prompts(DataConfig(source=source, path=str(out), style="math")).items
    return [(it.prompt, it.answer) for it in items]


def test_dapo_math_parquet_dedups_strips_instruction_and_reports_drops(tmp_path):
    def row(problem, gt, idx):
        return {"data_source": "math_dapo", "prompt": [{"content": DAPO_PREFIX + problem + DAPO_SUFFIX, "role": "user"}],
                "ability": "MATH", "reward_model": {"ground_truth": gt, "style": "rule-lighteval/MATH_v2"},
                "extra_info": {"index": idx}}
    rows = [row("What is $1+1$?", "2", "a"), row("What is $1+1$?", "2", "b"),  # DAPO repeats problems
            row("Find $x$ if $2x = 34$.", "17", "c"), row("Compute 3*4.", "", "d"), row("Ratio?", "???", "e")]
    src = _parquet(tmp_path / "dapo-math-17k.parquet", rows)
    out = tmp_path / "data" / "dapo_math_train.parquet"
    rep = prepare("dapo_math", out, inputs=[str(src)])
    assert (rep.read, rep.kept, rep.dropped) == (5, 2, 3)
    assert dict(rep.reasons) == {"duplicate problem": 1, "no answer": 1, "answer not parseable by math-verify": 1}
    assert rep.instructions_stripped == 2
    assert _loaded(out) == [("What is $1+1$?", "2"), ("Find $x$ if $2x = 34$.", "17")]
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == ["a", "c"] and set(table.column("source").to_pylist()) == {"dapo_math"}
    text = "\n".join(rep.lines())
    assert "dapo-math-17k.parquet:row 2: duplicate problem" in text and "row 4: no answer" in text


def test_math_jsonl_takes_the_last_boxed_answer(tmp_path):
    rows = [{"problem": "Half of one?", "level": "Level 1", "type": "Algebra",
             "solution": "We get $\\boxed{2}$ first, no: $\\boxed{\\frac{1}{2}}$."},
            {"problem": "No box here", "level": "Level 2", "type": "Algebra", "solution": "It is 5."}]
    src = _jsonl(tmp_path / "train.jsonl", rows, raw_lines=('{"problem": "torn',))
    out = tmp_path / "math_train.jsonl"
    rep = prepare("math", out, inputs=[str(src)])
    assert rep.kept == 1 and dict(rep.reasons) == {"no answer": 1, "invalid JSON": 1}
    assert _loaded(out) == [("Half of one?", "\\frac{1}{2}")]
    assert math_verify_reward("so the answer is $\\boxed{0.5}$", _loaded(out)[0][1]) == 1.0


def test_math500_answer_column_wins_over_solution(tmp_path):
    rows = [{"problem": "P1", "solution": "... \\boxed{3}", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
             "subject": "Precalculus", "level": 2, "unique_id": "test/precalculus/807.json"}]
    out = tmp_path / "math500.jsonl"
    prepare("math500", out, inputs=[str(_jsonl(tmp_path / "test.jsonl", rows))])
    assert _loaded(out) == [("P1", "\\left( 3, \\frac{\\pi}{2} \\right)")]
    assert json.loads(out.read_text())["id"] == "test/precalculus/807.json"


def test_gsm8k_directory_picks_the_split_and_strips_thousands(tmp_path):
    main = tmp_path / "gsm8k" / "main"
    main.mkdir(parents=True)
    _parquet(main / "train-00000-of-00001.parquet",
             [{"question": "How many?", "answer": "12 * 100 = <<12*100=1200>>1200 plus 34\n#### 1,234"}])
    _parquet(main / "test-00000-of-00001.parquet",
             [{"question": "Test q", "answer": "#### -7"}, {"question": "Bad", "answer": "no marker"}])
    out = tmp_path / "gsm8k_test.jsonl"
    rep = prepare("gsm8k", out, inputs=[str(tmp_path / "gsm8k")], split="test")
    assert rep.read == 2 and _loaded(out) == [("Test q", "-7")]
    out2 = tmp_path / "gsm8k_train.jsonl"
    prepare("gsm8k", out2, inputs=[str(tmp_path / "gsm8k")], split="train")
    assert _loaded(out2) == [("How many?", "1234")]
    assert math_verify_reward("\\boxed{1234}", "1234") == 1.0


def test_aime_and_amc_layouts(tmp_path):
    aime24 = _parquet(tmp_path / "aime24.parquet", [
        {"id": 60, "problem": "AIME P", "solution": "... \\boxed{033}", "answer": "033",
         "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_1", "year": "2024"}])
    prepare("aime24", tmp_path / "aime24.jsonl", inputs=[str(aime24)])
    assert _loaded(tmp_path / "aime24.jsonl") == [("AIME P", "33")]
    # opencompass/AIME2025: two JSONL files (I and II) with `question`/`answer`
    one = _jsonl(tmp_path / "aime2025-I.jsonl", [{"question": "Q1", "answer": "70"}])
    two = _jsonl(tmp_path / "aime2025-II.jsonl", [{"question": "Q2", "answer": "$\\boxed{588}$"}])
    rep = prepare("aime25", tmp_path / "aime25.jsonl", inputs=[str(one), str(two)])
    assert rep.kept == 2 and _loaded(tmp_path / "aime25.jsonl") == [("Q1", "70"), ("Q2", "588")]
    # AI-MO/aimo-validation-amc: float answers, AMC 2022 and 2023 mixed
    amc = _parquet(tmp_path / "amc.parquet", [
        {"id": 0, "problem": "A1", "answer": 142.0, "url": "https://aops/wiki/2023_AMC_12A_Problems/Problem_23"},
        {"id": 1, "problem": "A2", "answer": 3.5, "url": "https://aops/wiki/2022_AMC_12B_Problems/Problem_4"}])
    rep = prepare("amc23", tmp_path / "amc23.parquet", inputs=[str(amc)])
    assert dict(rep.reasons) == {"not an AMC 2023 problem (url)": 1}
    assert _loaded(tmp_path / "amc23.parquet") == [("A1", "142")]


def test_answer_normalisation_table():
    cases = {"$5$": "5", "\\boxed{12}": "12", "$\\boxed{\\frac{3}{4}}$": "\\frac{3}{4}", "007": "7", "-0": "0",
             "1,000,000": "1000000", "142.0": "142", "2.50": "2.50", "x^2+1": "x^2+1", "\\(8\\)": "8",
             "\\boxed{1}, \\boxed{2}": "\\boxed{1}, \\boxed{2}", "42.": "42"}
    assert {k: normalize_answer(k) for k in cases} == cases
    assert strip_dapo_instruction(DAPO_PREFIX + "P?" + DAPO_SUFFIX) == ("P?", True)
    assert strip_dapo_instruction("Plain problem") == ("Plain problem", False)


def test_refuses_to_overwrite_and_names_bad_input(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", [{"question": "Q", "answer": "#### 1"}])
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    with pytest.raises(DataError, match="refusing to overwrite"):
        prepare("gsm8k", out, inputs=[str(src)])
    assert out.read_text() == "precious\n"
    with pytest.raises(DataError, match="no usable rows"):
        prepare("gsm8k", tmp_path / "none.jsonl", inputs=[str(_jsonl(tmp_path / "x.jsonl", [{"q": 1}]))])
    assert not (tmp_path / "none.jsonl").exists()
    with pytest.raises(DataError, match="missing.csv: no such file"):
        prepare("gsm8k", tmp_path / "o.jsonl", inputs=[str(tmp_path / "missing.csv")])
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="broken.parquet: cannot read parquet file"):
        prepare("gsm8k", tmp_path / "o.jsonl", inputs=[str(tmp_path / "broken.parquet")])
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(DataError, match="either --input"):
        prepare("gsm8k", tmp_path / "o.jsonl")
    with pytest.raises(DataError, match=r"\.jsonl or \.parquet"):
        prepare("gsm8k", tmp_path / "o.csv", inputs=[str(src)])


def test_cli_reports_and_refuses_second_run(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", [{"question": "Q", "answer": "#### 1"}, {"question": "Q", "answer": "#### 1"}])
    out = tmp_path / "o.jsonl"
    cmd = [sys.executable, "-m", "erpo_mega.cli", "prepare-data", "gsm8k", "--input", str(src), "--out", str(out)]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "read 2 rows, kept 1, dropped 1" in first.stdout and "duplicate problem" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert second.returncode == 2 and "refusing to overwrite" in second.stderr and "Traceback" not in second.stderr


def test_prepared_file_is_an_eval_set_and_the_shipped_7b_config_points_at_prepared_files(tmp_path):
    from erpo_mega.config import ConfigError
    from erpo_mega.data.tokenizer import build_char_tokenizer, load_tokenizer
    from erpo_mega.orchestration.eval_config import EvalSetConfig
    from erpo_mega.orchestration.evaluate import load_eval_set
    from erpo_mega.run_config import load_run_config

    src = _jsonl(tmp_path / "aime.jsonl", [{"problem": f"P{i}", "answer": f"00{i}"} for i in range(1, 6)])
    out = tmp_path / "aime24.parquet"
    prepare("aime24", out, inputs=[str(src)])
    build_char_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    data = DataConfig(prompt_template="{prompt} (box it)", use_chat_template=False)
    es = load_eval_set("aime24", EvalSetConfig(path=str(out), samples=4, num_prompts=3), data, tok)
    assert [it.answer for it in es.items] == ["1", "2", "3"] and es.key("pass@4") == "aime24/pass@4"
    assert tok.decode(es.input_ids[0], skip_special_tokens=True).endswith("P1 (box it)")
    with pytest.raises(ConfigError, match="eval.sets.x.path"):
        load_eval_set("x", EvalSetConfig(), data, tok)  # no built-in task to fall back on

    cfg = load_run_config(str(REPO / "examples" / "erpo_qwen2.5_7b.yaml"))
    assert cfg.data.style == "math" and cfg.data.path == "data/dapo_math_{split}.parquet"
    assert {n: (s.path, s.samples) for n, s in cfg.eval.sets.items()} == {
        "aime24": ("data/aime24.jsonl", 32), "aime25": ("data/aime25.jsonl", 32),
        "amc23": ("data/amc23.jsonl", 16), "math500": ("data/math500.jsonl", 4)}


def test_hub_path_loads_every_part_through_datasets(tmp_path, monkeypatch):
    """--hf calls datasets.load_dataset once per part of the source (AIME 2025 comes as I and II)."""
    import types

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"question": f"{config} q", "answer": "12"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rep = prepare("aime25", tmp_path / "aime25.jsonl", hf=True)
    assert calls == [("opencompass/AIME2025", "AIME2025-I", "test"), ("opencompass/AIME2025", "AIME2025-II", "test")]
    assert rep.kept == 2 and _loaded(tmp_path / "aime25.jsonl") == [("AIME2025-I q", "12"), ("AIME2025-II q", "12")]
    calls.clear()
    prepare("aime25", tmp_path / "other.jsonl", hf="math-ai/aime25")  # another upload: default config
    assert calls == [("math-ai/aime25", None, "test")]
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match="needs the `datasets` library"):
        prepare("gsm8k", tmp_path / "g.jsonl", hf=True)
