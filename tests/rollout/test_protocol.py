"""Protocol validation, the flattened-bucket layout and the sampling rules (no server)."""

import math

import pytest
import torch

from erpo_mega.rollout.engine.sampling import choose_token, truncated_probs
from erpo_mega.rollout.protocol import (
    GenerateOutput,
    GenerateReqInput,
    ProtocolError,
    UpdateWeightsFromDistributedReqInput,
    parse,
    parse_sampling_params,
)
from erpo_mega.rollout.tensor_wire import (
    align_order,
    bucket_layout,
    deserialize_named_tensors,
    flatten_bucket,
    serialize_named_tensors,
    unflatten_bucket,
)
from erpo_mega.weights.transport import iter_buckets


def test_unknown_sampling_key_is_rejected_by_name():
    with pytest.raises(ProtocolError, match="'seed'.*sampling_seed"):
        parse_sampling_params({"seed": 3})


def test_null_sampling_values_mean_defaults_and_greedy_rule():
    sp = parse_sampling_params({"temperature": None, "top_k": None, "stop": "x"})
    assert sp.temperature == 1.0 and sp.top_k == -1 and sp.stop == ["x"] and not sp.greedy
    assert parse_sampling_params({"temperature": 0}).greedy
    assert parse_sampling_params({"top_k": 1}).greedy


@pytest.mark.parametrize("params,field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"),
    ({"min_p": 1.5}, "min_p"), ({"max_new_tokens": 2, "min_new_tokens": 3}, "min_new_tokens"),
    ({"logit_bias": {"999": 1.0}}, "logit_bias"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_verify_names_the_bad_parameter(params, field):
    with pytest.raises(ProtocolError, match=f"sampling_params.{field}"):
        parse_sampling_params(params).verify(vocab_size=100)


def test_wrong_type_names_field():
    with pytest.raises(ProtocolError, match="max_new_tokens"):
        parse_sampling_params({"max_new_tokens": "ten"})


def test_generate_request_shapes():
    with pytest.raises(ProtocolError, match="exactly one of 'text' or 'input_ids'"):
        parse(GenerateReqInput, {}, "generate")
    req = parse(GenerateReqInput, {"input_ids": [[1, 2], [3]], "return_logprob": [True, False],
                                   "unknown_top_level": 1}, "generate")
    assert req.is_batch and req.batch_size == 2
    assert req.per_item("return_logprob", 1, None) is False
    single = parse(GenerateReqInput, {"input_ids": [1, 2, 3]}, "generate")
    assert not single.is_batch and single.batch_size == 1
    with pytest.raises(ProtocolError, match="names .* dtypes .* shapes"):
        parse(UpdateWeightsFromDistributedReqInput, {"names": ["a"], "dtypes": [], "shapes": [[1]]}, "x")


@pytest.mark.parametrize("ids", [[[5, True]], [[5, "a"]], [[5], 3], [1.5], [[1], [2.0]], [[[1]]], "12"])
def test_generate_input_ids_of_wrong_types_are_refused(ids):
    """The fast check of plain int ids refuses (via the generic path) what is not ints."""
    with pytest.raises(ProtocolError, match="input_ids"):
        parse(GenerateReqInput, {"input_ids": ids}, "generate")


def test_generate_input_ids_kept_as_sent():
    ids = [[5] * 12 for _ in range(4)]
    req = parse(GenerateReqInput, {"input_ids": ids, "sampling_params": {"n": 2}}, "generate")
    assert req.input_ids == ids and req.batch_size == 4 and req.sampling_params == {"n": 2}
    with pytest.raises(ProtocolError, match="exactly one of 'text' or 'input_ids'"):
        parse(GenerateReqInput, {"input_ids": ids, "text": ["a"] * 4}, "generate")
    with pytest.raises(ProtocolError, match="return_logprob"):
        parse(GenerateReqInput, {"input_ids": ids, "return_logprob": "yes"}, "generate")


def test_generate_output_from_sglang_json():
    item = {"text": "", "output_ids": [4, 5],
            "meta_info": {"finish_reason": {"type": "stop", "matched": 5}, "weight_version": "7",
                          "output_token_logprobs": [[-0.5, 4, None], [-1.25, 5, None]]}}
    out = GenerateOutput.from_json(item)
    assert out.output_ids == [4, 5] and out.output_token_logprobs == [-0.5, -1.25]
    assert out.finish_type == "stop" and out.weight_version == "7"


def test_bucket_layout_is_contiguous_and_refuses_unaligned_offsets():
    # SGLang's layout: packed in names order, no padding. float32 (2,2): bytes 0-16;
    # bf16 [1]: 16-18; uint8 [3]: 18-21 (the order align_order produces)
    metas, total = bucket_layout(["b", "c", "a"], [torch.float32, torch.bfloat16, torch.uint8],
                                 [[2, 2], [1], [3]])
    assert [(m.start_idx, m.end_idx, m.numel) for m in metas] == [(0, 16, 16), (16, 18, 2), (18, 21, 3)]
    assert total == 21
    with pytest.raises(ValueError, match="unaligned tensor 'b'.*byte offset 3"):
        bucket_layout(["a", "b"], [torch.uint8, torch.float32], [[3], [2]])
    named = [("a", torch.zeros(3, dtype=torch.uint8)), ("b", torch.zeros(2)), ("c", torch.zeros(1, dtype=torch.bfloat16))]
    assert [n for n, _ in align_order(named)] == ["b", "c", "a"]


def test_flatten_roundtrip_mixed_dtypes_through_forking_pickler():
    named = align_order([("w", torch.randn(3, 5)), ("b", torch.randn(7).to(torch.bfloat16)), ("i", torch.arange(3))])
    flat, metas = flatten_bucket(named)
    payload = serialize_named_tensors({"flattened_tensor": flat, "metadata": metas})
    back = deserialize_named_tensors(payload)
    for (n1, t1), (n2, t2) in zip(named, unflatten_bucket(back["flattened_tensor"], back["metadata"])):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2)


def test_iter_buckets_groups_by_bytes():
    ts = [(str(i), torch.zeros(n, dtype=torch.float32)) for i, n in enumerate([10, 10, 30, 5, 5])]
    sizes = [[name for name, _ in b] for b in iter_buckets(ts, bucket_bytes=80)]
    assert sizes == [["0", "1"], ["2"], ["3", "4"]]  # 80 B = 20 floats; the 30-float tensor travels alone


def test_truncation_matches_hand_computed_example():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    # top_p=0.7 keeps {0.5, 0.2} (0.5 < 0.7, 0.7 reached with 0.2) -> renormalised 5/7, 2/7
    p = truncated_probs(logits, parse_sampling_params({"top_p": 0.7}))
    torch.testing.assert_close(p, torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))
    # top_k=3 -> 0.5, 0.2, 0.15 over 0.85
    p = truncated_probs(logits, parse_sampling_params({"top_k": 3}))
    torch.testing.assert_close(p, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    # min_p=0.3 keeps p >= 0.15 -> same set as top_k=3
    p = truncated_probs(logits, parse_sampling_params({"min_p": 0.3}))
    torch.testing.assert_close(p, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    # temperature 2: p_i ∝ sqrt(p_i)
    p = truncated_probs(logits, parse_sampling_params({"temperature": 2.0}))
    s = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]).sqrt()
    torch.testing.assert_close(p, s / s.sum())


def test_choose_token_logprob_is_temperature_scaled_and_untruncated():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    sp = parse_sampling_params({"temperature": 2.0, "top_k": 2})
    g = torch.Generator().manual_seed(0)
    tok, lp = choose_token(logits, sp, [], [], g)
    assert tok in (0, 1)
    s = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]).sqrt()
    assert math.isclose(lp, math.log(s[tok] / s.sum()), rel_tol=1e-5)
    tok, lp = choose_token(logits, parse_sampling_params({"temperature": 0}), [], [0], g)
    assert tok == 1 and math.isclose(lp, float("-inf")) is False  # banned argmax moves to the next token
    assert math.isclose(lp, math.log(0.2 / 0.5), rel_tol=1e-5)   # log_softmax after the ban: 0.2 / (1 - 0.5)
