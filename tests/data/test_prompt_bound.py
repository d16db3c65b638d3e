"""A huge prompt line is dropped before it is tokenized (issue 14: a 20 MB line took 126 s and
8.5 GB, tokenized in full, only to be dropped as too long)."""

import json
import time
import warnings

from erpo_mega.config import from_dict
from erpo_mega.data.datasets import DataConfig, DataWarning, load_prompts
from erpo_mega.data.prompts import encode_prompts, max_token_chars
from erpo_mega.data.tokenizer import build_char_tokenizer


class SpyTokenizer:
    """The real tokenizer, recording the longest text it was asked to tokenize."""

    def __init__(self, tok):
        self.tok = tok
        self.longest = 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, text, **kw):
        self.longest = max(self.longest, len(text))
        return self.tok(text, **kw)

    def apply_chat_template(self, messages, **kw):
        self.longest = max(self.longest, sum(len(m["content"]) for m in messages))
        return self.tok.apply_chat_template(messages, **kw)


def test_huge_prompt_line_is_dropped_without_tokenizing(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "9" * 2_000_000, "answer": "1"},
            {"prompt": "2+2=", "answer": "4"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(DataConfig, {"source": "jsonl", "path": str(path), "max_prompt_len": 64})
    tok = SpyTokenizer(build_char_tokenizer(tmp_path / "tok"))
    items = load_prompts(cfg).items
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc = encode_prompts(items, tok, cfg)
    assert time.perf_counter() - t0 < 5.0
    assert enc.too_long == 1 and [it.answer for it in enc.items] == ["2", "4"]
    per_token = max_token_chars(tok.tok)
    assert tok.longest <= 64 * per_token, "tokenized the 2 MB prompt"
    msg = " ".join(str(w.message) for w in caught if issubclass(w.category, DataWarning))
    assert f"train.jsonl:2 (>= {-(-2_000_000 // per_token)} tokens)" in msg


def test_char_bound_is_a_lower_bound_on_tokens(tmp_path):
    tok = build_char_tokenizer(tmp_path / "tok")
    per_token = max_token_chars(tok)
    for text in ("1+2*3", "<|user|>12", "x" * 50):
        assert len(tok(text, add_special_tokens=False)["input_ids"]) >= len(text) / per_token
