import pytest

from erpo_mega.config import from_dict
from erpo_mega.data.batcher import PromptBatcher
from erpo_mega.data.datasets import DataConfig, DataWarning
from erpo_mega.data.prompts import encode_prompt, encode_prompts
from erpo_mega.data.tokenizer import build_char_tokenizer
from erpo_mega.data.types import PromptItem

ITEMS = [PromptItem(f"{i}+1", str((i + 1) % 10)) for i in range(10)]


def take(batcher, n):
    return [b.indices for b in (batcher.next_batch() for _ in range(n))]


def test_batches_cover_each_epoch_once_and_repeat_per_seed():
    a = take(PromptBatcher(ITEMS, prompts_per_step=4, group_size=3, seed=1), 5)
    assert a == take(PromptBatcher(ITEMS, prompts_per_step=4, group_size=3, seed=1), 5)
    assert a != take(PromptBatcher(ITEMS, prompts_per_step=4, group_size=3, seed=2), 5)
    flat = [i for b in a for i in b]
    assert sorted(flat[:10]) == list(range(10))  # epoch 0: a permutation
    assert sorted(flat[10:20]) == list(range(10))  # epoch 1 (batch 3 straddles the boundary)


def test_expanded_is_group_major():
    batch = PromptBatcher(ITEMS, prompts_per_step=2, group_size=3, seed=0).next_batch()
    ex = batch.expanded()
    assert [g for g, _ in ex] == [0, 0, 0, 1, 1, 1]
    assert [it for _, it in ex][3] is batch.items[1]


def test_resume_continues_identically():
    ref = PromptBatcher(ITEMS, prompts_per_step=3, group_size=2, seed=7)
    first = take(ref, 4)
    state = ref.state_dict()
    rest = take(ref, 6)
    resumed = PromptBatcher(ITEMS, prompts_per_step=3, group_size=2, seed=7)
    resumed.load_state_dict(state)
    assert take(resumed, 6) == rest
    assert resumed.step == ref.step == 10
    assert first  # (the first 4 batches were consumed before the save)


def test_resume_refuses_other_dataset_or_seed():
    state = PromptBatcher(ITEMS, 3, 2, seed=7).state_dict()
    with pytest.raises(ValueError, match="'seed'"):
        PromptBatcher(ITEMS, 3, 2, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="'fingerprint'"):
        PromptBatcher(ITEMS[::-1], 3, 2, seed=7).load_state_dict(state)


def test_encode_prompt_chat_and_raw(tmp_path):
    tok = build_char_tokenizer(tmp_path / "tok")
    item = PromptItem("7+3", "0")
    chat = from_dict(DataConfig, {"system_prompt": "s", "prompt_template": "{prompt}="})
    ids = encode_prompt(item, tok, chat)
    assert tok.decode(ids) == "<bos><|system|>s<eos><|user|>7+3=<eos><|assistant|>"
    raw = from_dict(DataConfig, {"use_chat_template": False})
    assert encode_prompt(item, tok, raw) == [tok.bos_token_id] + tok("7+3")["input_ids"]


def test_overlong_prompts_dropped_with_count(tmp_path):
    tok = build_char_tokenizer(tmp_path / "tok")
    items = [PromptItem("1+1", "2", {"source": "f.jsonl", "line": 1}),
             PromptItem("1+1+1+1+1+1", "6", {"source": "f.jsonl", "line": 2})]
    c = from_dict(DataConfig, {"use_chat_template": False, "max_prompt_len": 5})
    with pytest.warns(DataWarning, match=r"f.jsonl:2 \(12 tokens\)"):
        enc = encode_prompts(items, tok, c)
    assert enc.too_long == 1 and enc.items == items[:1] and len(enc.input_ids[0]) == 4
