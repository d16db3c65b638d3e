"""A character-level tokenizer built locally, saved as a normal HuggingFace tokenizer directory.

The embedded tiny model must train with no downloads, so its tokenizer is built here from a
fixed alphabet (one token per character) with the `tokenizers` library and saved with
`tokenizer.json` + `tokenizer_config.json` (special tokens and a jinja chat template). Any code
that takes an HF tokenizer dir (`AutoTokenizer.from_pretrained`, SGLang) can then load it.

Chat format (every turn ends with the eos token, so one stop id ends a generation):
    <bos><|user|>7+3*2<eos><|assistant|>7+3=0;0*2=0;#0<eos>
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *CHAT_MARKERS)
PUNCTUATION = " \n+-*/=;#.,:?!(){}\\^_'%$<>"
ALPHABET = string.digits + string.ascii_lowercase + string.ascii_uppercase + PUNCTUATION

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def char_vocab() -> dict[str, int]:
    """Token -> id: special tokens first (pad=0, bos=1, eos=2, unk=3), then the alphabet."""
    tokens = list(SPECIAL_TOKENS) + list(ALPHABET)
    if len(set(tokens)) != len(tokens):
        raise AssertionError("duplicate token in the character alphabet")
    return {tok: i for i, tok in enumerate(tokens)}


def _raw_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab=char_vocab(), unk_token=UNK))
    # Every character (newlines included) is its own pre-token; WordLevel maps it to an id.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def tokenizer_config() -> dict:
    """Contents of `tokenizer_config.json`, written by hand so it loads in transformers 4.x and 5.x alike."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": list(CHAT_MARKERS),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }


def build_char_tokenizer(out_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Build the character tokenizer, save it as an HF tokenizer dir at `out_dir`, return it loaded.

    Files are written into a temp sibling directory that is renamed into place, so a crash never
    leaves a half-written tokenizer for a later run to load.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _raw_tokenizer().save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old.{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(out)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load any HF tokenizer dir (ours or a real model's) from local files only."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path}: not a tokenizer directory (no tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
