"""`erpo-mega prepare-data`: public math sets -> the project's layout, with a report of every dropped row.

Output rows are `{"problem", "answer", "source", "id"}` (JSONL or parquet by the file suffix),
which `data.style: math` (training) and `eval.sets.*.path` (evaluation) read directly. Answers are
normalised for math-verify (GSM8K's `#### 1,234` -> `1234`, MATH's last `\\boxed{}`, `$...$` and a
whole-answer `\\boxed{}` unwrapped, `033` -> `33`, `142.0` -> `142`) and then parsed by
math-verify exactly as the reward will parse them: a reference the reward cannot read would
score every response 0, so such rows are dropped and named. Duplicate problems (DAPO-Math-17k
ships each problem about 100 times) are dropped too. An existing output is never overwritten.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erpo_mega.data.answers import gsm8k_answer, last_boxed
from erpo_mega.data.prepare_sources import SOURCES, HFLocation, SourceSpec
from erpo_mega.data.types import DataError

_SUFFIXES = (".parquet", ".jsonl", ".json")


@dataclass
class Dropped:
    where: str
    reason: str


@dataclass
class PrepareReport:
    source: str
    out: str
    read: int = 0
    kept: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[Dropped] = field(default_factory=list)  # the first few drops of each reason
    instructions_stripped: int = 0

    def drop(self, where: str, reason: str) -> None:
        key = reason.split(":")[0]
        self.reasons[key] += 1
        if self.reasons[key] <= 3:
            self.examples.append(Dropped(where, reason))

    @property
    def dropped(self) -> int:
        return sum(self.reasons.values())

    def lines(self) -> list[str]:
        out = [f"{self.source}: read {self.read} rows, kept {self.kept}, dropped {self.dropped} -> {self.out}"]
        for reason, n in self.reasons.most_common():
            out.append(f"  dropped {n:>7}  {reason}")
        for d in self.examples:
            out.append(f"    e.g. {d.where}: {d.reason}")
        if self.instructions_stripped:
            out.append(f"  note: removed the DAPO answer-format instruction from {self.instructions_stripped} "
                       "prompts (use data.prompt_template to ask for the format you want)")
        return out

    def as_dict(self) -> dict:
        return {"source": self.source, "out": self.out, "read": self.read, "kept": self.kept,
                "dropped": dict(self.reasons), "instructions_stripped": self.instructions_stripped}


# ---------------------------------------------------------------------------------- reading -----
def _input_files(paths: list[str], split: str | None) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _SUFFIXES)
            if split:
                found = [f for f in found if split in f.name]
            if not found:
                raise DataError(f"{p}: no {'/'.join(_SUFFIXES)} files{f' with {split!r} in the name' if split else ''}")
            files += found
        elif p.is_file():
            if p.suffix not in _SUFFIXES:
                raise DataError(f"{p}: unsupported file type {p.suffix!r} (use {', '.join(_SUFFIXES)})")
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    return files


def _rows_of_file(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    """(where, row, error) for each row of a parquet / JSONL / JSON file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:  # in record batches: DAPO-Math-17k's original file has 1.8M rows
            batches = pq.ParquetFile(path).iter_batches(batch_size=8192)
            i = 0
            for batch in batches:
                for row in batch.to_pylist():
                    i += 1
                    yield f"{path}:row {i}", row, None
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read parquet file: {e}") from None
        return
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not a JSON document ({e}); JSON Lines files must end in .jsonl") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows (or {{\"data\": [...]}}), got {type(data).__name__}")
        for i, row in enumerate(data, start=1):
            yield f"{path}:item {i}", row, None
        return
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(raw.decode("utf-8")), None
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield f"{path}:{lineno}", None, f"invalid JSON: {e}"


def _rows_of_hub(locations: tuple[HFLocation, ...]) -> Iterator[tuple[str, Any, str | None]]:
    try:
        import datasets
    except ImportError:
        raise DataError("--hf needs the `datasets` library (pip install 'erpo-mega[data]' or "
                        "pip install datasets); or download the files and pass --input") from None
    for loc in locations:
        try:
            ds = datasets.load_dataset(loc.dataset, loc.config, split=loc.split)
        except Exception as e:  # offline, gated, renamed: say which and how to go on
            raise DataError(f"cannot load {loc.dataset} ({loc.config or 'default'}, {loc.split}) from the Hub: "
                            f"{e}; download it and pass --input") from None
        for i, row in enumerate(ds, start=1):
            yield f"{loc.dataset}[{loc.split}]#{i}", row, None


# ---------------------------------------------------------------------------------- answers -----
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
_INTEGER = re.compile(r"^(-?)0*(\d+)$")
_FLOAT_INT = re.compile(r"^(-?\d+)\.0+$")


def normalize_answer(text: str) -> str:
    """A reference answer as math-verify reads it best: bare, no `$`, no whole-answer `\\boxed{}`."""
    s = text.strip()
    for _ in range(3):  # `$\boxed{5}$` needs two rounds
        if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
            s = s.strip("$").strip()
        if s.startswith("\\(") and s.endswith("\\)"):
            s = s[2:-2].strip()
        boxed = last_boxed(s) if s.startswith(("\\boxed", "\\fbox")) else None
        if boxed is not None and s.endswith("}") and s.count("\\boxed") + s.count("\\fbox") == 1:
            s = boxed.strip()
    s = s.rstrip(".").strip() if re.fullmatch(r"-?[\d,]+(\.\d+)?\.", s) else s
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    m = _FLOAT_INT.match(s)
    if m:
        s = m.group(1)
    m = _INTEGER.match(s)
    if m:
        s = m.group(1) + m.group(2) if m.group(2) != "0" else "0"
    return s


def _get(row: dict, dotted: str) -> Any:
    node: Any = row
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _problem_text(value: Any, name: str) -> str:
    if isinstance(value, list):  # a chat prompt (DAPO): the last user message
        users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[-1], str):
            raise ValueError(f"field '{name}' is a message list without a user message")
        value = users[-1]
    if not isinstance(value, str):
        raise ValueError(f"field '{name}' must be text, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"empty problem: field '{name}' is blank")
    return value.strip()


def _answer_text(value: Any, name: str, how: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"field '{name}' must be text or a number, got {type(value).__name__}")
    text = str(value).strip()
    if how == "boxed":
        got = last_boxed(text)
        if got is None:
            raise ValueError(f"no answer: field '{name}' has no \\boxed{{...}}")
        text = got
    elif how == "gsm8k":
        got = gsm8k_answer(text)
        if got is None:
            raise ValueError(f"no answer: field '{name}' has no '#### <answer>' line")
        text = got
    text = normalize_answer(text)
    if not text:
        raise ValueError(f"no answer: field '{name}' is empty")
    return text


def _first(row: dict, names: tuple[str, ...]) -> tuple[str, Any] | None:
    for n in names:
        v = _get(row, n)
        if v is not None:
            return n, v
    return None


def convert_row(row: dict, spec: SourceSpec) -> tuple[dict, bool]:
    """One output row (and whether an instruction was stripped); ValueError names what is wrong."""
    got = _first(row, spec.problem_fields)
    if got is None:
        raise ValueError(f"missing field: one of {list(spec.problem_fields)} (row has {sorted(row)})")
    problem = _problem_text(got[1], got[0])
    stripped = False
    if spec.clean_problem is not None:
        problem, stripped = spec.clean_problem(problem)
        if not problem:
            raise ValueError("empty problem: nothing left after removing the instruction")
    for name, how in spec.answer_fields:
        value = _get(row, name)
        if value is not None:
            answer = _answer_text(value, name, how)
            break
    else:
        raise ValueError(f"no answer: none of {[n for n, _ in spec.answer_fields]} present")
    ident = _first(row, spec.id_fields)
    return {"problem": problem, "answer": answer, "source": spec.name,
            "id": "" if ident is None else str(ident[1])}, stripped


def _check_gold(answer: str) -> str | None:
    """None when math-verify can read the reference answer, else the reason."""
    from erpo_mega.rewards.math_verify_reward import BadGoldAnswer, VerifyTimeout, parse_gold

    try:
        parsed = parse_gold(answer)
        if all(isinstance(x, str) for x in parsed):  # no math object: only a literal string match
            return f"answer not parseable by math-verify: {answer!r} yields no mathematical expression"
    except (BadGoldAnswer, VerifyTimeout) as e:
        return f"answer not parseable by math-verify: {e}"
    except Exception as e:  # math-verify's own parser errors
        return f"answer not parseable by math-verify: {type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------------------------- writing -----
def _refuse_existing(out: Path) -> None:
    if out.exists():
        raise DataError(f"{out} already exists; refusing to overwrite it (delete it or choose another --out)")


def _write(rows: list[dict], out: Path) -> None:
    """Write to a temp file, then link it into place: an existing file (even one created meanwhile)
    is never replaced, and a crash leaves no half-written output."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if out.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(
                [(k, pa.string()) for k in ("problem", "answer", "source", "id")])), tmp)
        else:
            with tmp.open("w", encoding="utf-8") as fh:
                for r in rows:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        try:
            os.link(tmp, out)
        except FileExistsError:
            raise DataError(f"{out} appeared while preparing; refusing to overwrite it") from None
    finally:
        tmp.unlink(missing_ok=True)


def prepare(source: str, out: str | Path, inputs: list[str] | None = None, hf: str | bool | None = None,
            split: str | None = None, limit: int | None = None, check_answers: bool = True) -> PrepareReport:
    """Convert one source (local files `inputs`, or the Hub with `hf`) into `out` (.jsonl/.parquet)."""
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    spec = SOURCES[source]
    out = Path(out)
    if out.suffix not in (".jsonl", ".parquet"):
        raise DataError(f"--out {out}: the name must end in .jsonl or .parquet")
    _refuse_existing(out)
    if bool(inputs) == bool(hf):
        raise DataError("give either --input FILE/DIR (a local copy) or --hf (download through `datasets`)")
    if inputs:
        rows = (r for f in _input_files(inputs, split) for r in _rows_of_file(f))
    else:
        locs = spec.hf_splits.get(split, spec.hf) if split else spec.hf
        if isinstance(hf, str):  # another upload: its default config, the given (or the usual) split
            locs = (HFLocation(hf, None, split or locs[0].split),)
        rows = _rows_of_hub(locs)
    report = PrepareReport(source, str(out))
    kept: list[dict] = []
    seen: set[str] = set()
    for where, row, error in rows:
        report.read += 1
        if error is None and not isinstance(row, dict):
            error = f"not a row object: {type(row).__name__}"
        if error is None and spec.row_filter is not None:
            error = spec.row_filter(row)
        if error is None:
            try:
                item, stripped = convert_row(row, spec)
            except ValueError as e:
                error = str(e)
        if error is None:
            key = " ".join(item["problem"].split())
            if key in seen:
                error = "duplicate problem"
            elif check_answers:
                error = _check_gold(item["answer"])
        if error is not None:
            report.drop(where, error)
            continue
        seen.add(key)
        report.instructions_stripped += stripped
        kept.append(item)
        if limit and len(kept) >= limit:
            break
    report.kept = len(kept)
    if not kept:
        raise DataError(f"{source}: no usable rows out of {report.read}; nothing written.\n" + "\n".join(report.lines()))
    _write(kept, out)
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="erpo-mega prepare-data", description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", choices=list(SOURCES), help="which dataset")
    p.add_argument("--input", nargs="+", metavar="PATH", help="local copy: parquet/jsonl/json files or a directory")
    p.add_argument("--hf", nargs="?", const=True, metavar="DATASET_ID",
                   help="load through `datasets` from the Hub (default id per source; see --list)")
    p.add_argument("--split", help="which split's files to take from a directory / which Hub split")
    p.add_argument("--out", help="output file, .jsonl or .parquet (never overwritten)")
    p.add_argument("--limit", type=int, help="keep at most N rows")
    p.add_argument("--no-check-answers", action="store_true",
                   help="skip the math-verify parse of every reference answer (faster, less safe)")
    p.add_argument("--list", action="store_true", help="list the sources and their Hub locations")
    args = p.parse_args(argv)
    if args.list or not args.source:
        for s in SOURCES.values():
            where = " + ".join(f"{h.dataset}" + (f" ({h.config})" if h.config else "") + f" [{h.split}]" for h in s.hf)
            print(f"{s.name:10} {s.title}\n{'':10} hub: {where}")
        return 0 if args.list else 2
    if not args.out:
        p.error("--out is required")
    try:
        report = prepare(args.source, args.out, inputs=args.input, hf=args.hf, split=args.split, limit=args.limit,
                         check_answers=not args.no_check_answers)
    except DataError as e:
        print(f"erpo-mega prepare-data: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    return 0
