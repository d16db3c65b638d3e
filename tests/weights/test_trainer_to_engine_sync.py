"""Weights pushed from a TP=2 x PP=2 megatron trainer (gloo) reach the embedded engine by every path.

The engine starts on random HF model A; the trainer holds a *different* random model B
(HF -> megatron conversion, loaded at TP2xPP2). For each method (disk, tensor, distributed)
the engine is first reset to A, then the trainer exports B live (`iter_hf_weights`, a
collective over all four ranks) and rank 0 pushes it. The references are independent of the
code under test: B's own safetensors files (compared bit for bit) and transformers' greedy
decoding of B (which must differ from A's, so a push that changed nothing would fail).

One 4-rank spawn covers all three methods (spawning dominates the cost), plus the per-stage
distributed push ("staged"): each pipeline stage's tp=0 rank sends the layers its stage owns
over its own weight-update group, stage 0 coordinating the engine's session.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from erpo_mega.models.convert import convert_hf_to_mcore
from erpo_mega.parallel.dist import free_port
from erpo_mega.parallel.spawn import run_distributed
from erpo_mega.rollout.launch import launch_embedded_server
from tests.models.tiny_hf import save_hf_model

pytestmark = pytest.mark.slow

METHODS = ("disk", "tensor", "distributed", "staged")
PROMPT = [5, 17, 33, 8, 120, 61]
MAX_NEW = 8
GREEDY = {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}
WHOLE_TENSOR = 1 << 30      # get_weights_by_name slices dim 0 to this: larger than any dim, so no truncation
BUCKET_BYTES = 64_000       # the ~0.6 MB model travels in several buckets per method
A_VERSION = "A"


def _hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _hf_greedy(hf_dir, prompt: list[int], n: int) -> list[int]:
    """transformers' own forward pass, argmax at each step (greedy decoding, eos ignored)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _trainer_rank(a_dir: str, b_mcore: str, url: str, disk_root: str, names: list[str]) -> dict | None:
    """One trainer rank: load B at TP2xPP2, then export + push it by each method.

    Every rank iterates `iter_hf_weights` (a sequence of TP/PP collectives); only global rank 0
    receives tensors, talks to the engine and returns what the engine reports back.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from erpo_mega.models.builder import build_gpt_model
    from erpo_mega.models.convert import load_weights_into, read_model_config
    from erpo_mega.orchestration.engines import StagedWeightSync
    from erpo_mega.parallel.dist import free_port, init_distributed
    from erpo_mega.rollout.client import SGLangClient
    from erpo_mega.weights.export import iter_hf_weights
    from erpo_mega.weights.transport import DistributedWeightSender, push_weights

    init_distributed(tp=2, pp=2)
    cfg = read_model_config(b_mcore)
    model = build_gpt_model(cfg).eval()
    load_weights_into([model], b_mcore, cfg)
    rank0 = dist.get_rank() == 0

    client = sender = staged = None
    leader = ps.get_tensor_model_parallel_rank() == 0      # this stage's sender in the staged push
    if rank0:
        client = SGLangClient(url, timeout=300, max_retries=1, backoff=0.1)
        # A separate TCPStore + gloo group (trainer rank 0, engine rank 1): not megatron's default group.
        sender = DistributedWeightSender([client], "127.0.0.1", free_port(), backend="gloo").connect()
    if leader:  # the tp=0 ranks of both stages: their pipeline group is the leaders' group
        staged = StagedWeightSync(ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_rank(),
                                  [client] if rank0 else None, address="127.0.0.1", backend="gloo").connect()
    results: dict = {}
    try:
        for method in METHODS:
            if method == "staged":
                named = iter_hf_weights([model], cfg, yield_on="stage")
                if not rank0:
                    pushed_here: list[str] = []
                    if leader:
                        staged.sync(((n, t) for n, t in named if not pushed_here.append(n)), "v-staged",
                                    BUCKET_BYTES)
                        results["stage1_pushed"] = pushed_here
                    else:
                        for _ in named:
                            raise AssertionError("only stage leaders should receive exported tensors")
                    continue
            else:
                named = iter_hf_weights([model], cfg)
            if not rank0:
                for _ in named:  # lockstep: take part in the collectives; nothing is yielded here
                    raise AssertionError("only global rank 0 should receive exported tensors")
                continue
            client.update_weights_from_disk(a_dir, weight_version=A_VERSION)  # back to A first
            before = client.generate([PROMPT], GREEDY)[0]
            pushed: list[str] = []

            def recording(it, pushed=pushed):
                for name, t in it:
                    pushed.append(name)
                    yield name, t

            if method == "staged":
                report = staged.sync(recording(named), "v-staged", BUCKET_BYTES)
            else:
                report = push_weights(recording(named), [client], method=method, bucket_bytes=BUCKET_BYTES,
                                      weight_version=f"v-{method}", disk_dir=f"{disk_root}/{method}",
                                      sender=sender)
            after = client.generate([PROMPT], GREEDY)[0]
            weights = {}
            for name in names:
                values = client.get_weights_by_name(name, truncate_size=WHOLE_TENSOR)
                weights[name] = torch.tensor(values, dtype=torch.float64)  # float32 values, held exactly
            results[method] = dict(
                before=before.output_ids, before_version=before.weight_version,
                after=after.output_ids, after_version=after.weight_version,
                info_version=client.model_info()["weight_version"], pushed=pushed, weights=weights,
                buckets=report.buckets, tensors=report.tensors, bytes=report.bytes)
    finally:
        if sender is not None:
            sender.close()
        if staged is not None:
            staged.close()
    dist.barrier()
    if rank0:
        return results
    return results or None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_to_engine")
    a_dir = save_hf_model("qwen2", root / "A", seed=0)
    b_dir = save_hf_model("qwen2", root / "B", seed=1)
    b_mcore = convert_hf_to_mcore(b_dir, root / "B_mcore", tp=2, pp=2, progress=False)
    server = launch_embedded_server(a_dir, "127.0.0.1", free_port(), num_threads=1, timeout=180,
                                    log_path=root / "engine.log")
    try:
        initial = server.client(timeout=120).generate([PROMPT], GREEDY)[0]
        yield dict(root=root, a_dir=a_dir, b_dir=b_dir, b_mcore=b_mcore, url=server.url, initial=initial)
    finally:
        server.close()


@pytest.fixture(scope="module")
def references(setup):
    return dict(a_greedy=_hf_greedy(setup["a_dir"], PROMPT, MAX_NEW),
                b_greedy=_hf_greedy(setup["b_dir"], PROMPT, MAX_NEW),
                b_tensors=_hf_tensors(setup["b_dir"]))


@pytest.fixture(scope="module")
def pushed(setup, references):
    names = sorted(references["b_tensors"])
    per_rank = run_distributed(_trainer_rank, 4, str(setup["a_dir"]), str(setup["b_mcore"]), setup["url"],
                               str(setup["root"] / "pushed"), names, timeout_s=600)
    assert per_rank[1] is None and per_rank[3] is None   # tp=1 ranks only take part in collectives
    per_rank[0]["staged"]["stage1_pushed"] = per_rank[2]["stage1_pushed"]
    return per_rank[0]


def test_models_a_and_b_generate_differently(setup, references):
    # Without this, "the output changed to B's" could not tell a push from no push.
    assert references["a_greedy"] != references["b_greedy"]
    assert setup["initial"].output_ids == references["a_greedy"]


@pytest.mark.parametrize("method", METHODS)
def test_push_replaces_a_with_b(pushed, references, method):
    got = pushed[method]
    b_tensors = references["b_tensors"]
    # the engine served A right before the push ...
    assert got["before"] == references["a_greedy"]
    assert got["before_version"] == A_VERSION
    # ... the export sent each of B's tensors once, in several buckets ...
    if method == "staged":  # stage 0 sent its own layers, stage 1's leader the rest, over its own group
        stage1 = got["stage1_pushed"]
        assert stage1 and got["pushed"] and not set(stage1) & set(got["pushed"])
        assert "lm_head.weight" in stage1 and "model.embed_tokens.weight" in got["pushed"]
        mine = got["pushed"]
        got["pushed"] = mine + stage1
        assert got["tensors"] == len(mine)
        assert got["bytes"] == sum(b_tensors[n].numel() * b_tensors[n].element_size() for n in mine)
    else:
        assert got["tensors"] == len(b_tensors) and got["buckets"] > 1
        assert got["bytes"] == sum(t.numel() * t.element_size() for t in b_tensors.values())
    assert sorted(got["pushed"]) == sorted(b_tensors) and len(got["pushed"]) == len(set(got["pushed"]))
    # ... and afterwards the engine holds B bit for bit, reports the new version and decodes like B.
    assert got["info_version"] == f"v-{method}"
    assert got["after_version"] == f"v-{method}"
    for name, ref in b_tensors.items():
        assert ref.dtype == torch.float32
        engine_value = got["weights"][name]
        assert engine_value.shape == ref.shape, name
        assert torch.equal(engine_value, ref.double()), name
    assert got["after"] == references["b_greedy"]
