import json

import pytest
from transformers import AutoTokenizer

from erpo_mega.data.tokenizer import ALPHABET, build_char_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "char"
    build_char_tokenizer(path)
    return path


def test_files_and_config(tok_dir):
    assert sorted(p.name for p in tok_dir.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<bos>" and cfg["eos_token"] == "<eos>" and cfg["pad_token"] == "<pad>"
    assert "chat_template" in cfg


def test_autotokenizer_round_trip(tok_dir):
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(tok) < 100
    text = "7+3*2-4=13;#9 \\boxed{1/2}\nAbc"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, no bos/eos added
    assert tok.decode(ids) == text
    # ids of single characters follow the fixed alphabet after the 7 special tokens
    assert tok.convert_tokens_to_ids(["<pad>", "<bos>", "<eos>", "<unk>"]) == [0, 1, 2, 3]
    assert tok("0")["input_ids"] == [7 + ALPHABET.index("0")]
    assert tok("é")["input_ids"] == [tok.unk_token_id]


def test_chat_template(tok_dir):
    tok = load_tokenizer(tok_dir)
    msgs = [{"role": "user", "content": "7+3"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<bos><|user|>7+3<eos><|assistant|>"
    out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    user, asst = tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    expected = [tok.bos_token_id, user, *tok("7+3")["input_ids"], tok.eos_token_id, asst]
    assert list(ids) == expected
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "#0"}], tokenize=False)
    assert full == "<bos><|user|>7+3<eos><|assistant|>#0<eos>"
    assert tok.decode(expected, skip_special_tokens=True) == "7+3"


def test_rebuild_replaces_atomically(tok_dir):
    build_char_tokenizer(tok_dir)
    assert [p.name for p in tok_dir.parent.iterdir()] == ["char"]  # no temp dirs left behind
    assert load_tokenizer(tok_dir).decode([7]) == "0"


def test_load_missing_dir_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
