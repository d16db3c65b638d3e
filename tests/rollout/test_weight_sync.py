"""Weights pushed by disk, tensor and distributed paths reach two engines; a real sglang-router
in front of them spreads requests over both.

Each push sends a *different* random model's weights; the engines must then return exactly
those tensors (`get_weights_by_name`) and generate that model's greedy tokens (checked with
transformers).
"""

import pytest
import torch

from erpo_mega.parallel.dist import free_port
from erpo_mega.rollout.launch import launch_embedded_server, launch_router
from erpo_mega.weights.transport import DistributedWeightSender, push_weights
from tests.rollout.helpers import save_tiny_model

PROMPT = [5, 17, 33, 8]
CHECK_NAMES = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias",
               "model.layers.1.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("engines")
    save_tiny_model(base / "init", "qwen2", seed=0)
    handles = []
    try:
        for i in range(2):  # start both, then wait: the two start-ups overlap
            handles.append(launch_embedded_server(base / "init", port=free_port(), num_threads=1, wait=False,
                                                  log_path=base / f"engine{i}.log"))
        for h in handles:
            h.wait_healthy(120)
        router = launch_router([h.url for h in handles], port=free_port(), log_path=base / "router.log",
                               policy="round_robin", extra_args=["--log-level", "warn", "--shutdown-grace-period-secs", "1"])
        handles.append(router)
        yield base, [h.client(timeout=60, max_retries=1, backoff=0.05) for h in handles[:2]], router.client()
    finally:
        for h in handles:
            h.close()


def greedy_reference(hf, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def assert_engines_hold(engines, hf, version):
    sd = hf.state_dict()
    for e in engines:
        for name in CHECK_NAMES:
            assert e.get_weights_by_name(name, truncate_size=10_000) == sd[name].tolist(), (e, name)
        out = e.generate([PROMPT], {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True})[0]
        assert out.output_ids == greedy_reference(hf, PROMPT, 6)
        assert out.weight_version == version
        assert e.model_info()["weight_version"] == version


def named(hf):
    return list(hf.state_dict().items())


def test_router_spreads_generate_over_both_engines(cluster):
    _, engines, router = cluster
    before = [e.server_info()["requests_total"] for e in engines]
    outs = router.generate([PROMPT] * 6, {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True})
    after = [e.server_info()["requests_total"] for e in engines]
    assert len(outs) == 6 and all(o.output_ids == outs[0].output_ids for o in outs)
    assert sum(a - b for a, b in zip(after, before)) == 6
    assert all(a - b >= 2 for a, b in zip(after, before)), (before, after)   # round robin: 3 + 3


def test_push_via_disk(cluster):
    base, engines, _ = cluster
    hf = save_tiny_model(base / "scratch1", "qwen2", seed=101)
    report = push_weights(named(hf), engines, method="disk", disk_dir=base / "pushed", weight_version="disk-1",
                          bucket_bytes=20_000)
    assert report.buckets > 1 and report.tensors == len(hf.state_dict())
    assert (base / "pushed" / "model.safetensors.index.json").is_file()
    assert_engines_hold(engines, hf, "disk-1")


@pytest.mark.parametrize("flattened", [True, False])
def test_push_via_tensor(cluster, flattened):
    base, engines, router = cluster
    hf = save_tiny_model(base / f"scratch2{flattened}", "qwen2", seed=202 + flattened)
    report = push_weights(named(hf), engines, method="tensor", bucket_bytes=30_000, flattened=flattened,
                          weight_version=f"tensor-{flattened}")
    assert report.buckets > 1
    assert_engines_hold(engines, hf, f"tensor-{flattened}")
    # through the router, every completion now comes from the new weights
    outs = router.generate([PROMPT] * 4, {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True})
    assert all(o.output_ids == greedy_reference(hf, PROMPT, 6) for o in outs)


def test_push_via_distributed_gloo(cluster):
    base, engines, _ = cluster
    with DistributedWeightSender(engines, "127.0.0.1", free_port(), backend="gloo") as sender:
        for step, flattened in enumerate([True, False]):
            hf = save_tiny_model(base / f"scratch3{step}", "qwen2", seed=303 + step)
            report = push_weights(named(hf), engines, method="distributed", sender=sender, bucket_bytes=25_000,
                                  flattened=flattened, weight_version=f"dist-{step}")
            assert report.buckets > 1 and report.bytes == sum(t.numel() * 4 for t in hf.state_dict().values())
            assert_engines_hold(engines, hf, f"dist-{step}")


def test_bad_push_is_rejected_and_loses_nothing(cluster):
    base, engines, _ = cluster
    before = engines[0].get_weights_by_name("model.norm.weight")
    with pytest.raises(Exception, match="shape mismatch for 'model.norm.weight'"):
        push_weights([("model.layers.0.input_layernorm.weight", torch.zeros(32)),
                      ("model.norm.weight", torch.zeros(5))], engines[:1], method="tensor")
    assert engines[0].get_weights_by_name("model.norm.weight") == before
    assert engines[0].get_weights_by_name("model.layers.0.input_layernorm.weight") != [0.0] * 32


def test_rollout_sends_each_grpo_group_to_one_engine(cluster, tmp_path):
    """Through a cache_aware router (our default), all samples of a GRPO group run on one worker,
    which then prefills the prompt once; each sample is still its own request with its own seed."""
    from erpo_mega.data.batcher import PromptBatch
    from erpo_mega.data.types import PromptItem
    from erpo_mega.orchestration.rollout_step import generate_rollout, sample_seed

    _, engines, _ = cluster
    router = launch_router([e.base_url for e in engines], port=free_port(), log_path=tmp_path / "router.log",
                           extra_args=["--log-level", "warn", "--shutdown-grace-period-secs", "1"])

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    class Reward:
        def batch(self, items, texts):
            return [float(len(t)) for t in texts]

    G = 4
    try:
        client = router.client(timeout=60)
        for g in range(3):
            batch = PromptBatch(items=[PromptItem(prompt=f"p{g}", answer="")], indices=[g], group_size=G,
                                step=g, epoch=0)
            prompt = [5 + g] + list(range(20, 44))
            before = [e.server_info()["requests_total"] for e in engines]
            r = generate_rollout(client, batch, [prompt], Tok(), Reward(), run_seed=1, step=g, max_new_tokens=3,
                                 temperature=1.0, concurrency=G, extra_sampling={"ignore_eos": True})
            after = [e.server_info()["requests_total"] for e in engines]
            assert sorted(a - b for a, b in zip(after, before)) == [0, G], (g, before, after)
            assert all(len(ids) == 3 for ids in r.response_ids)
            # the sample's own seed decides its tokens, whichever worker ran it
            alone = engines[0].generate([prompt], {"max_new_tokens": 3, "ignore_eos": True, "temperature": 1.0,
                                                   "sampling_seed": sample_seed(1, g, 1)})[0]
            assert alone.output_ids == r.response_ids[1]
    finally:
        router.close()
