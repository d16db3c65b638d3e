"""The one record every data source maps to, so rollout and rewards never see file formats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]


@dataclass(frozen=True)
class PromptItem:
    """A prompt (plain text or a chat message list), its reference answer, and provenance.

    `meta` carries where the item came from (file/line or task/split) and, for the
    built-in task, `checker="builtin_arithmetic"` so rewards can take the fast path.
    """

    prompt: str | list[Message]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    def messages(self) -> list[Message]:
        """The prompt as a chat message list (a plain string becomes one user turn)."""
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [dict(m) for m in self.prompt]

    def text(self) -> str:
        """The prompt as plain text (chat prompts: the contents joined by newlines)."""
        if isinstance(self.prompt, str):
            return self.prompt
        return "\n".join(m["content"] for m in self.prompt)


class DataError(ValueError):
    """A data file or row cannot be used; the message names the file and line."""
