"""The public math sets `erpo-mega prepare-data` knows: where each lives on the Hub and its columns.

Column names differ between the uploads of one benchmark (AIME 2024 has `problem`/`answer` in
HuggingFaceH4/aime_2024 but `Problem`/`Answer` elsewhere; AIME 2025 has `question` in
opencompass/AIME2025), so every source lists the candidates in order and the first one present
in a row wins. Answers are read `raw` (a final answer column), from the last `\\boxed{}` of a
worked solution (`boxed`, MATH) or after `####` (`gsm8k`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

# DAPO-Math-17k wraps every problem in an instruction asking for a final "Answer: ..." line. It is
# removed (counted in the report) so that training and the eval sets share one prompt template.
_DAPO_PREFIX = re.compile(r"^\s*Solve the following math problem step by step\..*?\n\s*\n", re.DOTALL)
_DAPO_SUFFIX = re.compile(r"\n\s*\n\s*Remember to put your answer on its own line after \"Answer:\"\.?\s*$")


def strip_dapo_instruction(text: str) -> tuple[str, bool]:
    """The bare problem of a DAPO-Math prompt, and whether an instruction was removed."""
    out = _DAPO_SUFFIX.sub("", _DAPO_PREFIX.sub("", text, count=1), count=1)
    return out.strip(), out != text


def _amc_2023_only(row: dict) -> str | None:
    """AI-MO/aimo-validation-amc holds AMC 2022 and 2023; "AMC 2023" (40 problems) is the 2023 part."""
    url = row.get("url")
    if isinstance(url, str) and "2023" not in url:
        return "not an AMC 2023 problem (url)"
    return None


@dataclass(frozen=True)
class HFLocation:
    dataset: str
    config: str | None
    split: str


@dataclass(frozen=True)
class SourceSpec:
    name: str
    title: str
    hf: tuple[HFLocation, ...]  # the default upload (several parts are concatenated)
    problem_fields: tuple[str, ...]
    answer_fields: tuple[tuple[str, str], ...]  # (dotted field, extraction: raw | boxed | gsm8k)
    id_fields: tuple[str, ...] = ("id", "unique_id", "ID", "problem_idx", "extra_info.index")
    row_filter: Callable[[dict], str | None] | None = None  # -> reason to drop, or None
    clean_problem: Callable[[str], tuple[str, bool]] | None = None
    hf_splits: dict[str, tuple[HFLocation, ...]] = field(default_factory=dict)  # other splits


_PROBLEM = ("problem", "Problem", "question", "Question")
_ANSWER = (("answer", "raw"), ("Answer", "raw"), ("expected_answer", "raw"))

SOURCES: dict[str, SourceSpec] = {s.name: s for s in (
    SourceSpec("dapo_math", "DAPO-Math-17k (training set of DAPO)",
               (HFLocation("BytedTsinghua-SIA/DAPO-Math-17k", None, "train"),),
               ("prompt",) + _PROBLEM, (("reward_model.ground_truth", "raw"),) + _ANSWER,
               clean_problem=strip_dapo_instruction),
    SourceSpec("math", "MATH (Hendrycks et al.), 7.5k train / 5k test",
               (HFLocation("DigitalLearningGmbH/MATH-lighteval", None, "train"),),
               _PROBLEM, _ANSWER + (("solution", "boxed"),),
               hf_splits={"test": (HFLocation("DigitalLearningGmbH/MATH-lighteval", None, "test"),)}),
    SourceSpec("math500", "MATH-500 (the 500-problem MATH test subset of 'Let's Verify Step by Step')",
               (HFLocation("HuggingFaceH4/MATH-500", None, "test"),),
               _PROBLEM, _ANSWER + (("solution", "boxed"),)),
    SourceSpec("gsm8k", "GSM8K grade-school math",
               (HFLocation("openai/gsm8k", "main", "train"),),
               _PROBLEM, (("answer", "gsm8k"),),
               hf_splits={"test": (HFLocation("openai/gsm8k", "main", "test"),)}),
    SourceSpec("aime24", "AIME 2024 (I and II, 30 problems)",
               (HFLocation("HuggingFaceH4/aime_2024", None, "train"),),
               _PROBLEM, _ANSWER + (("solution", "boxed"),)),
    SourceSpec("aime25", "AIME 2025 (I and II, 30 problems)",
               (HFLocation("opencompass/AIME2025", "AIME2025-I", "test"),
                HFLocation("opencompass/AIME2025", "AIME2025-II", "test")),
               _PROBLEM, _ANSWER),
    SourceSpec("amc23", "AMC 2023 (40 problems)",
               (HFLocation("AI-MO/aimo-validation-amc", None, "train"),),
               _PROBLEM, _ANSWER, row_filter=_amc_2023_only),
)}
