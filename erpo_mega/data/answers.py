"""Pulling the reference answer out of a worked solution (MATH `\\boxed{}`, GSM8K `#### x`)."""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (braces balanced) or `\\boxed x`; None when there is none
    or its braces never close."""
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    i = start + len(cmd)
    if i < len(text) and text[i] == " ":  # `\boxed 5`: the argument is the next token
        m = re.match(r" +([^\s$]+)", text[i:])
        return m.group(1) if m else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def gsm8k_answer(text: str) -> str | None:
    """The number after the final `####` of a GSM8K answer, thousands separators removed."""
    at = text.rfind("####")
    if at < 0:
        return None
    value = text[at + 4 :].strip().replace(",", "")
    return value or None
