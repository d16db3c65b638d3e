"""Every byte the weight push sends to SGLang, judged by SGLang 0.5.23's own code.

The push runs for real (`push_weights`) against a recorder that stands where the HTTP
server would be and keeps each request's arguments; SGLang's `MultiprocessingSerializer`
(its SafeUnpickler allowlist) and `FlattenedTensorBucket` then do exactly what its scheduler
and weight updater do with them: take entry `[tp_rank]`, deserialize, rebuild the bucket
through its own metadata class. The result must equal the sent tensors bit for bit, for engine
TP 1 and 2, flattened and not, mixed dtypes. The distributed layout must equal the one
SGLang computes for the same names/dtypes/shapes, and the launch command must parse.
"""

import pickle

import pytest
import torch

from erpo_mega.rollout.engine.auth import request_allowed
from erpo_mega.rollout.launch import sglang_server_command
from erpo_mega.rollout.tensor_wire import (
    UnsafePayloadError,
    align_order,
    bucket_layout,
    deserialize_named_tensors,
    flatten_bucket,
    serialize_per_rank,
)
from erpo_mega.weights.transport import push_weights
from tests import sglang_referee as ref


@pytest.fixture(scope="module")
def sgl():
    return ref.require()


def mixed_tensors(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        ("model.embed_tokens.weight", torch.randn(7, 5, generator=g).to(torch.bfloat16)),
        ("model.norm.weight", torch.randn(5, generator=g)),                         # fp32
        ("model.layers.0.mlp.gate.bias", torch.randn(3, generator=g).to(torch.float16)),
        ("model.layers.0.step", torch.randint(-5, 5, (3,), generator=g)),             # int64
        ("model.layers.0.mask", torch.randint(0, 255, (5,), generator=g).to(torch.uint8)),
        ("lm_head.weight", torch.randn(4, 5, generator=g).to(torch.bfloat16)),
    ]


class Recorder:
    """Where an SGLang server would be: answers like one and records every call."""

    def __init__(self, tp_size: int):
        self.tp_size, self.calls, self.base_url = tp_size, [], f"recorder-tp{tp_size}"

    def engine_tp_size(self):
        return self.tp_size

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return {"success": True, "message": "ok"}
        return call


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def sglang_receives(entry: str, load_format):
    """What SGLang's TP worker + weight updater make of one rank's entry."""
    obj = ref.deserialize(entry)
    if load_format == "flattened_bucket":
        return ref.reconstruct_flattened(obj)
    return list(obj)


@pytest.mark.parametrize("flattened", [True, False])
def test_tensor_push_payloads_are_what_sglang_accepts(sgl, flattened):
    sent = mixed_tensors()
    engines = [Recorder(1), Recorder(2)]
    push_weights(sent, engines, method="tensor", bucket_bytes=120, flattened=flattened, weight_version="v7")
    want = dict(sent)
    for e in engines:
        names = [c[0] for c in e.calls]
        # pause, session, buckets, session end, version once, flush once, resume (item 9)
        n_buckets = names.count("update_weights_from_tensor")
        assert n_buckets > 1
        assert names == ["pause_generation", "begin_weight_update", *["update_weights_from_tensor"] * n_buckets,
                         "end_weight_update", "update_weight_version", "flush_cache", "continue_generation"]
        assert [c[1] for c in e.calls if c[0] == "update_weight_version"] == [("v7",)]
        got = {}
        for name, args, kwargs in e.calls:
            if name != "update_weights_from_tensor":
                continue
            payloads = args[0]
            assert kwargs["flush_cache"] is False and "weight_version" not in kwargs
            assert kwargs["load_format"] == ("flattened_bucket" if flattened else None)
            assert len(payloads) == e.tp_size                      # serialized_named_tensors[tp_rank]
            per_rank = [sglang_receives(p, kwargs["load_format"]) for p in payloads]
            for rank_named in per_rank:
                assert [n for n, _ in rank_named] == [n for n, _ in per_rank[0]]
                for n, t in rank_named:
                    assert t.dtype == want[n].dtype and t.shape == want[n].shape
                    assert bits(t) == bits(want[n]), n
            got.update(per_rank[0])
        assert set(got) == set(want)


def test_our_metadata_unpickles_in_sglang_and_sglangs_in_ours(sgl):
    named = align_order(mixed_tensors(1))
    flat, metas = flatten_bucket(named)
    # ours, read by SGLang (SimpleNamespace is on its allowlist; our dataclass would not be)
    obj = ref.deserialize(serialize_per_rank({"flattened_tensor": flat, "metadata": metas}, 1)[0])
    assert [type(m).__name__ for m in obj["metadata"]] == ["SimpleNamespace"] * len(named)
    # SGLang's own bucket and metadata class, serialized by SGLang, read by our engine's unpickler
    bucket = ref.FlattenedTensorBucket(named_tensors=named)
    theirs = ref.serialize({"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()})
    back = deserialize_named_tensors(theirs)
    from erpo_mega.rollout.engine.engine import _named_tensors_from_payload

    for (n, t), (n2, t2) in zip(named, _named_tensors_from_payload(back, "flattened_bucket")):
        assert n == n2 and bits(t) == bits(t2)


@pytest.mark.parametrize("seed", range(5))
def test_distributed_flattened_layout_equals_sglangs(sgl, seed):
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.int32]
    named = []
    for i in range(int(torch.randint(2, 9, (1,), generator=g))):
        dt = dtypes[int(torch.randint(0, len(dtypes), (1,), generator=g))]
        shape = [int(s) for s in torch.randint(1, 6, (int(torch.randint(1, 3, (1,), generator=g)),), generator=g)]
        named.append((f"t{i}", torch.zeros(shape, dtype=dt)))
    named = align_order(named)
    names, dts, shapes = [n for n, _ in named], [t.dtype for _, t in named], [list(t.shape) for _, t in named]
    ours, total = bucket_layout(names, dts, shapes)
    # the receive side of update_weights_from_distributed (flattened_bucket)
    theirs = ref.FlattenedTensorBucket.empty(names, [str(d).removeprefix("torch.") for d in dts], shapes, "cpu")
    assert [(m.name, tuple(m.shape), m.dtype, m.start_idx, m.end_idx, m.numel) for m in ours] == \
        [(m.name, tuple(m.shape), m.dtype, m.start_idx, m.end_idx, m.numel) for m in theirs.get_metadata()]
    assert total == theirs.get_flattened_tensor().numel()
    # and the bytes we broadcast are the ones SGLang's own bucket builds from the same tensors
    filled = [(n, torch.randint(0, 100, t.shape, generator=g).to(t.dtype)) for n, t in named]
    assert bits(flatten_bucket(filled)[0]) == bits(ref.FlattenedTensorBucket(named_tensors=filled).flattened_tensor)


def test_unaligned_order_is_refused_by_both(sgl):
    names, dts, shapes = ["a", "b"], [torch.uint8, torch.float32], [[3], [2]]
    with pytest.raises(ValueError, match="nalign"):
        ref.FlattenedTensorBucket.empty(names, ["uint8", "float32"], shapes, "cpu")
    with pytest.raises(ValueError, match="nalign"):
        bucket_layout(names, dts, shapes)


class Boom:
    def __reduce__(self):
        import os

        return (os.system, ("true",))


def test_allowlists_refuse_code_both_ours_and_sglangs(sgl):
    evil = pickle.dumps([("w", Boom())])
    with pytest.raises(RuntimeError, match="Blocked unsafe global"):
        ref.deserialize(evil)
    with pytest.raises(UnsafePayloadError, match="posix.system|os.system"):
        deserialize_named_tensors(evil)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_sglang_launch_command_parses_with_sglangs_parser(sgl, tp):
    cmd = sglang_server_command("/models/qwen", host="10.0.0.5", port=30001, tp=tp, api_key="k-123",
                                enable_memory_saver=True, deterministic=True)
    args = ref.parse_server_args(cmd)
    assert (args.tp_size, args.dp_size, args.host, args.port, args.api_key) == (tp, 1, "10.0.0.5", 30001, "k-123")
    assert args.enable_deterministic_inference and args.enable_memory_saver
    assert "--tp-size" in cmd and "--tp" not in cmd


@pytest.mark.parametrize("path", ["/generate", "/update_weights_from_tensor", "/health", "/health_generate",
                                  "/metrics", "/model_info"])
@pytest.mark.parametrize("header", [None, "Bearer k", "bearer k", "Bearer x", "Basic k", "Bearer", "k"])
@pytest.mark.parametrize("key", [None, "k"])
def test_api_key_decisions_equal_sglangs(sgl, path, header, key):
    auth = ref.load().common  # noqa: F841  (ensures the referee is loaded)
    from sglang.srt.utils.auth import AuthLevel, decide_request_auth

    level = AuthLevel.ADMIN_OPTIONAL if path.startswith("/update_weights") else AuthLevel.NORMAL
    theirs = decide_request_auth(method="POST", path=path, authorization_header=header, api_key=key,
                                 admin_api_key=None, auth_level=level).allowed
    assert request_allowed("POST", path, header, key) == theirs


@pytest.mark.slow  # two fresh interpreters import SGLang: ~20-50 s on 2 shared cores
def test_distributed_bucket_received_by_sglangs_own_group_and_bucket_code(sgl):
    """Engine TP 2: two receivers join as ranks 1 and 2 (rank_offset 1 + tp_rank) with SGLang's
    init_custom_process_group, allocate with its FlattenedTensorBucket.empty and get our
    broadcast bit for bit: same store prefixes, same layout, same world size."""
    import json
    import os
    import subprocess
    import sys

    from erpo_mega.parallel.dist import free_port
    from erpo_mega.rollout.tensor_wire import dtype_name, init_weight_group

    named = align_order(mixed_tensors(3))
    spec = [[n for n, _ in named], [dtype_name(t.dtype) for _, t in named], [list(t.shape) for _, t in named]]
    port, world = free_port(), 3
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.rollout.sglang_receiver", str(port), str(rank),
                               str(world), json.dumps(spec)], cwd=root, stdout=subprocess.PIPE, text=True)
             for rank in (1, 2)]
    try:
        group = init_weight_group("127.0.0.1", port, 0, world, "weight_update_group", "gloo", timeout_s=120)
        group.broadcast(flatten_bucket(named)[0])
        outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for out in outs:
        assert out == {n: bits(t).hex() for n, t in named}
