"""Packing, data-parallel split and layout mapping, against hand-worked examples (no processes)."""

import pytest
import torch

from erpo_mega.config import ConfigError
from erpo_mega.megatron.batching import (
    PolicyBatch,
    block_causal_mask,
    build_micro_batch,
    global_normalizer,
    pack_sequences,
    plan_micro_batches,
    split_for_data_parallel,
)
from erpo_mega.megatron.config import OptimConfig, ParallelConfig


def test_first_fit_decreasing_by_hand():
    # lengths 5,4,3,3,2 into budget 7: 5->bin0 (room 2), 4->bin1 (room 3), 3->bin1 (room 0),
    # 3->bin2 (room 4), 2->bin0 (room 0)
    assert pack_sequences([5, 4, 3, 3, 2], 7) == [[0, 4], [1, 2], [3]]


def test_pack_skips_empty_and_rejects_too_long():
    assert pack_sequences({3: 0, 7: 2}, 4) == [[7]]
    with pytest.raises(ValueError, match="sample 1 needs 9 tokens"):
        pack_sequences([2, 9], 8)


def test_dp_split_balances_tokens_deterministically():
    # longest first, each to the least-loaded rank: 9 -> r0 (9), 7 -> r1 (7), 4 -> r1 (11),
    # 3 -> r0 (12), 2 -> r1 (13)
    assert split_for_data_parallel([3, 9, 2, 7, 4], 2) == [[0, 1], [2, 3, 4]]
    assert split_for_data_parallel([1, 1, 1], 1) == [[0, 1, 2]]


def _toy_batch(**kw):
    return PolicyBatch(prompt_ids=[[10, 11], [20]], response_ids=[[12, 13, 14], [21, 22]], **kw)


def test_micro_batch_layout_by_hand():
    b = _toy_batch()
    mb = build_micro_batch(b, [0, 1], pad_to=8)
    # sample 0 fed as 10 11 12 13 (predicts 11 12 13 14); sample 1 as 20 21 (predicts 21 22); 2 pads
    assert mb.input_ids.tolist() == [[10, 11, 12, 13, 20, 21, 0, 0]]
    assert mb.target_ids.tolist() == [[11, 12, 13, 14, 21, 22, 0, 0]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1]]
    # response token t of sample 0 is scored at row position 1 + t; of sample 1 at 4 + t
    assert mb.gather_pos.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert mb.valid.tolist() == [[True, True, True], [True, True, False]]
    allowed = ~mb.attention_mask[0, 0]
    assert allowed[3].tolist() == [True, True, True, True, False, False, False, False]
    assert allowed[5].tolist() == [False, False, False, False, True, True, False, False]
    assert allowed[7].tolist() == [False] * 6 + [True, True]


def test_block_causal_mask_is_causal_within_segments():
    m = ~block_causal_mask(torch.tensor([0, 0, 1]))[0, 0]
    assert m.tolist() == [[True, False, False], [True, True, False], [False, False, True]]


def test_unpack_and_scatter_round_trip():
    b = _toy_batch()
    mb = build_micro_batch(b, [1, 0])
    row = torch.arange(mb.num_tokens, dtype=torch.float32) * 10  # value = 10 * position
    vals = mb.unpack(row)
    # samples in the order [1, 0]: sample 1 (input 20 21) first at positions 0..1
    assert vals.tolist() == [[0.0, 10.0, 0.0], [30.0, 40.0, 50.0]]
    dest = torch.full((2, 3), -1.0)
    mb.scatter_into(dest, vals)
    assert dest.tolist() == [[30.0, 40.0, 50.0], [0.0, 10.0, -1.0]]


def test_per_token_inputs_follow_their_samples():
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    loss_mask = torch.tensor([[True, False, True], [True, True, False]])
    b = _toy_batch(advantages=adv, old_logp=-adv, loss_mask=loss_mask)
    mb = build_micro_batch(b, [1])
    assert mb.per_token["advantages"].tolist() == [[4.0, 5.0]]
    assert mb.per_token["old_logp"].tolist() == [[-4.0, -5.0]]
    assert mb.loss_mask.tolist() == [[True, True]]
    norm = global_normalizer(b)
    assert (norm.num_tokens, norm.num_seqs) == (4.0, 2.0)


def test_plans_cover_every_sample_once_across_dp_ranks():
    g = torch.Generator().manual_seed(0)
    prompts = [[1] * int(n) for n in torch.randint(1, 6, (11,), generator=g)]
    responses = [[2] * int(n) for n in torch.randint(1, 9, (11,), generator=g)]
    b = PolicyBatch(prompts, responses)
    seen = []
    for rank in range(3):
        for mb in plan_micro_batches(b, rank, 3, micro_batch_tokens=12, uniform_length=True, pad_multiple=4):
            assert mb.num_tokens % 4 == 0 and mb.num_tokens <= 12
            seen.extend(mb.samples)
    assert sorted(seen) == list(range(11))


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="advantages: expected shape \\(2, 3\\)"):
        _toy_batch(advantages=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="prompt_ids\\[1\\]: empty prompt"):
        PolicyBatch([[1], []], [[2], [3]])
    with pytest.raises(ValueError, match="loss_mask: marks positions beyond"):
        _toy_batch(loss_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="rank 1 of 2 got no non-empty sample"):
        plan_micro_batches(PolicyBatch([[1]], [[2]]), 1, 2, micro_batch_tokens=8)


def test_configs_validate():
    with pytest.raises(ConfigError, match="min_lr"):
        OptimConfig(lr=1e-6, min_lr=1e-5)
    with pytest.raises(ConfigError, match="warmup_steps"):
        OptimConfig(warmup_steps=10, total_steps=10)
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        ParallelConfig.from_dict({"micro_batch_tokens": 0})
    with pytest.raises(ConfigError, match="lr_schedule"):
        OptimConfig.from_dict({"lr_schedule": "step"})


def test_packing_can_be_disabled():
    # attention backends that ignore an explicit mask get one sample per micro-batch
    assert pack_sequences([2, 2, 2], 10, max_per_bin=1) == [[0], [1], [2]]
    b = PolicyBatch([[1], [1], [1]], [[2, 3], [2], [2, 3, 4]])
    mbs = plan_micro_batches(b, 0, 1, micro_batch_tokens=16, pack=False)
    assert [mb.samples for mb in mbs] == [[2], [0], [1]]


def test_thd_params_describe_each_packed_sample_and_the_padding():
    """TransformerEngine's packed rows (issue 13, defect 5): one sequence per sample, padding last."""
    import torch

    from erpo_mega.megatron.batching import PolicyBatch, build_micro_batch

    batch = PolicyBatch([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]])  # inputs: 4 and 4 tokens
    mb = build_micro_batch(batch, [0, 1], pad_to=11)
    assert mb.seg_lengths == [4, 4, 3]
    p = mb.thd_params()
    assert p.qkv_format == "thd" and p.cu_seqlens_q.dtype == torch.int32
    assert p.cu_seqlens_q.tolist() == [0, 4, 8, 11] and p.max_seqlen_q == 4
    assert torch.equal(p.cu_seqlens_kv, p.cu_seqlens_q)
    # the mask path and the THD path describe the same blocks
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(mb.seg_lengths))
    assert torch.equal(mb.attention_mask[0, 0], ~((seg[:, None] == seg[None, :]) & torch.ones(11, 11).tril().bool()))
    assert build_micro_batch(batch, [1]).to("cpu").seg_lengths == [4]
