"""TorchLLM against transformers' own Qwen2/Llama forward (random tiny weights)."""

import pytest
import torch

from erpo_mega.models.torch_llm import TorchLLM, iter_hf_safetensors
from tests.rollout.helpers import save_tiny_model

CASES = [
    ("qwen2", dict()),
    ("qwen2", dict(tie=True)),
    ("llama", dict(attention_bias=True)),
    ("llama", dict(kv_heads=4)),
]


@pytest.mark.parametrize("arch,kw", CASES)
def test_full_forward_matches_transformers(tmp_path, arch, kw):
    hf = save_tiny_model(tmp_path, arch, **kw)
    ours = TorchLLM.from_hf_dir(tmp_path)
    ids = torch.randint(3, 96, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_state_dict_uses_hf_names(tmp_path):
    hf = save_tiny_model(tmp_path, "qwen2")
    ours = TorchLLM.from_hf_dir(tmp_path)
    assert set(ours.state_dict()) == set(hf.state_dict())
    for name, t in iter_hf_safetensors(tmp_path):
        assert torch.equal(ours.state_dict()[name], t), name


def test_sharded_checkpoint_loads(tmp_path):
    hf = save_tiny_model(tmp_path / "one", "llama")
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a, b = TorchLLM.from_hf_dir(tmp_path / "one"), TorchLLM.from_hf_dir(tmp_path / "sharded")
    for (n1, t1), (n2, t2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_left_padded_incremental_decoding_equals_full_forward(tmp_path, arch):
    """Greedy-extend ragged prompts with the cache; each row's logits equal its own unpadded full forward."""
    hf = save_tiny_model(tmp_path, arch)
    ours = TorchLLM.from_hf_dir(tmp_path)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 96, (n,), generator=g) for n in (5, 9, 2)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = True
    cache = ours.new_cache(3, width + 6)
    seqs = [p.tolist() for p in prompts]
    with torch.no_grad():
        logits = ours(ids, mask, cache)[:, -1]
        steps = [logits]
        for _ in range(6):
            nxt = logits.argmax(-1)
            for i in range(3):
                seqs[i].append(int(nxt[i]))
            logits = ours(nxt[:, None], None, cache)[:, -1]
            steps.append(logits)
        for i in range(3):
            full = hf(input_ids=torch.tensor([seqs[i]])).logits[0]
            n = len(prompts[i])
            for t, step in enumerate(steps):
                torch.testing.assert_close(step[i], full[n - 1 + t], atol=2e-5, rtol=1e-4)
