"""HF -> megatron checkpoint -> GPTModel at TP2xPP2, TP4 and TP1: logits equal HuggingFace's;
live export at TP2xPP2 and TP4 returns the HF tensors bit for bit.

One spawn of 4 gloo ranks runs every layout for both architectures (spawning is the cost).
The reference is independent: transformers' own forward pass and the safetensors files
`save_pretrained` wrote.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from erpo_mega.models.convert import convert_hf_to_mcore
from erpo_mega.parallel.spawn import run_distributed
from tests.models.tiny_hf import VOCAB, hf_logits, sample_tokens, save_hf_model

pytestmark = pytest.mark.slow  # one 4-rank spawn: ~45 s idle, 2-3 min on a loaded 2-core box

ARCHS = ("qwen2", "llama")
LAYOUTS = ((2, 2), (4, 1), (1, 1))  # TP4 > 2 kv groups: megatron's split-group QKV path


def _hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _megatron_logits(model, tokens: torch.Tensor):
    """Full-vocabulary logits from the last pipeline stage (None elsewhere), via megatron's schedule."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch, seq = tokens.shape
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)

    def forward_step(data_iterator, model):
        output = model(next(data_iterator), positions, attention_mask=None)

        def collect(output_tensor, non_loss_data=False):
            return gather_from_tensor_model_parallel_region(output_tensor)

        return output, collect

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
            seq_length=seq, micro_batch_size=batch, forward_only=True, collect_non_loss_data=True)
    return out[0] if ps.is_pipeline_last_stage() else None


def _plain_contract_load(model, ckpt_dir) -> None:
    """The trainer's way: dist_checkpointing.load(model.sharded_state_dict()) with strict load_state_dict."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt_dir))
    model.load_state_dict(loaded["model"], strict=True)


def _worker(cases: dict, tokens: torch.Tensor) -> dict:
    import torch.distributed as dist

    from erpo_mega.models.builder import build_gpt_model
    from erpo_mega.models.config import ModelConfig
    from erpo_mega.models.convert import load_weights_into
    from erpo_mega.parallel.dist import init_distributed
    from erpo_mega.weights.export import iter_hf_weights

    results = {}
    for tp, pp in LAYOUTS:
        init_distributed(tp=tp, pp=pp)
        for arch, (hf_dir, mcore_dir) in cases.items():
            cfg = ModelConfig.from_hf_dir(hf_dir)
            model = build_gpt_model(cfg).eval()
            if (tp, pp) == (1, 1):
                _plain_contract_load(model, mcore_dir)
            else:
                load_weights_into([model], mcore_dir, cfg)
            res = {"logits": _megatron_logits(model, tokens)}
            if (tp, pp) != (1, 1):
                res["export_rank0"] = {n: t.clone() for n, t in iter_hf_weights([model], cfg)}
                reference = _hf_tensors(hf_dir)
                got_all = dict(iter_hf_weights([model], cfg, yield_on="all"))
                res["export_all_equal"] = (got_all.keys() == reference.keys()
                                           and all(torch.equal(got_all[n], reference[n]) for n in reference))
            results[(arch, tp, pp)] = res
            del model
    dist.barrier()
    return results


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcore_load")
    cases = {}
    for arch in ARCHS:
        hf_dir = save_hf_model(arch, root / f"{arch}_hf")
        mcore_dir = convert_hf_to_mcore(hf_dir, root / f"{arch}_mcore", tp=2, pp=2, progress=False)
        cases[arch] = (hf_dir, mcore_dir)
    return cases


@pytest.fixture(scope="module")
def spawned(converted):
    tokens = sample_tokens()
    per_rank = run_distributed(_worker, 4, converted, tokens, timeout_s=600)
    reference = {arch: hf_logits(hf_dir, tokens) for arch, (hf_dir, _) in converted.items()}
    return per_rank, reference


def _last_stage_ranks(pp: int) -> list[int]:
    # megatron's default order (tp-cp-ep-dp-pp): the last pipeline stage holds the top ranks.
    per_stage = 4 // pp
    return list(range(4 - per_stage, 4))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_logits_match_huggingface(spawned, arch, tp, pp):
    per_rank, reference = spawned
    ref = reference[arch]
    last = _last_stage_ranks(pp)
    for rank in range(4):
        logits = per_rank[rank][(arch, tp, pp)]["logits"]
        if rank not in last:
            assert logits is None
            continue
        assert logits.shape[-1] == 256  # padded vocabulary
        torch.testing.assert_close(logits[..., :VOCAB], ref, rtol=1e-4, atol=1e-4)
        # zero padding rows give exactly zero logits for the padded ids
        assert torch.count_nonzero(logits[..., VOCAB:]) == 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tp,pp", [lay for lay in LAYOUTS if lay != (1, 1)])
def test_live_export_is_bit_exact(spawned, converted, arch, tp, pp):
    per_rank, _ = spawned
    reference = _hf_tensors(converted[arch][0])
    exported = per_rank[0][(arch, tp, pp)]["export_rank0"]
    assert list(exported) == list(dict.fromkeys(exported))  # each name once
    assert set(exported) == set(reference)
    for name, ref in reference.items():
        assert exported[name].dtype == ref.dtype, name
        assert torch.equal(exported[name], ref), name
    for rank in range(1, 4):  # rank0 mode: only global rank 0 yields
        assert per_rank[rank][(arch, tp, pp)]["export_rank0"] == {}
    for rank in range(4):
        assert per_rank[rank][(arch, tp, pp)]["export_all_equal"], f"rank {rank}"
