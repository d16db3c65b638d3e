"""Turning a `PromptItem` into prompt token ids: prompt template, optional system prompt, chat template."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from erpo_mega.data.datasets import DataConfig, DataWarning
from erpo_mega.data.types import DataError, Message, PromptItem


def render_messages(item: PromptItem, cfg: DataConfig) -> list[Message]:
    """The chat messages sent to the model: system prompt (if configured) + the templated prompt."""
    messages = item.messages()
    for m in reversed(messages):
        if m["role"] == "user":
            m["content"] = cfg.prompt_template.replace("{prompt}", m["content"])
            break
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return messages


def encode_prompt(item: PromptItem, tokenizer, cfg: DataConfig) -> list[int]:
    """Prompt token ids, ending where the model's answer starts.

    With `use_chat_template` the tokenizer's chat template is applied with a generation prompt;
    otherwise the templated text is tokenized and the bos token (if the tokenizer has one) prepended.
    """
    messages = render_messages(item, cfg)
    if cfg.use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.use_chat_template is true but the tokenizer has no chat_template")
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return [int(i) for i in ids]
    text = "\n".join(m["content"] for m in messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + [int(i) for i in ids]


@dataclass
class EncodedPrompts:
    items: list[PromptItem]
    input_ids: list[list[int]]
    too_long: int = 0


def max_token_chars(tokenizer) -> int | None:
    """The most characters one token of `tokenizer` can stand for (None: unknown).

    A vocabulary string is at least as long as the text it decodes to (byte-level BPE spells
    each byte as one character; SentencePiece spells each character as itself), so a text of
    C characters needs at least C / max_token_chars tokens.
    """
    cached = getattr(tokenizer, "_erpo_max_token_chars", 0)
    if cached:
        return cached
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # not an HF tokenizer: no bound, tokenize as before
        return None
    longest = max((len(t) for t in vocab), default=0) or None
    try:
        tokenizer._erpo_max_token_chars = longest
    except AttributeError:
        pass
    return longest


def encode_prompts(items: list[PromptItem], tokenizer, cfg: DataConfig) -> EncodedPrompts:
    """Encode all prompts, dropping those longer than `max_prompt_len` with a warning and a count.

    A prompt whose text alone has more characters than `max_prompt_len` tokens could spell
    is dropped before tokenization: a 20 MB line is not worth tokenizing (minutes, gigabytes)
    only to learn that it is too long.
    """
    kept, ids, dropped = [], [], []
    per_token = max_token_chars(tokenizer)
    char_bound = cfg.max_prompt_len * per_token if per_token else None
    for item in items:
        if char_bound is not None:
            n_chars = sum(len(m["content"]) for m in render_messages(item, cfg))
            if n_chars > char_bound:
                dropped.append((item, f">= {-(-n_chars // per_token)}"))
                continue
        toks = encode_prompt(item, tokenizer, cfg)
        if len(toks) > cfg.max_prompt_len:
            dropped.append((item, len(toks)))
            continue
        kept.append(item)
        ids.append(toks)
    if dropped:
        where = ", ".join(_where(it, n) for it, n in dropped[:5])
        warnings.warn(f"dropped {len(dropped)} prompt(s) longer than data.max_prompt_len="
                      f"{cfg.max_prompt_len} tokens: {where}{' ...' if len(dropped) > 5 else ''}",
                      DataWarning, stacklevel=2)
    if not kept and items:
        raise DataError(f"all {len(items)} prompts are longer than data.max_prompt_len={cfg.max_prompt_len}")
    return EncodedPrompts(kept, ids, len(dropped))


def _where(item: PromptItem, n_tokens: int | str) -> str:
    meta = item.meta
    loc = f"{meta['source']}:{meta['line']}" if "line" in meta else f"{meta.get('source')}#{meta.get('index')}"
    return f"{loc} ({n_tokens} tokens)"
