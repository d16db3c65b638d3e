"""Vocab-parallel log-prob/entropy against a full-vocabulary float64 reference.

Every rank builds the same full logits from a seed and feeds its vocabulary shard to
`logprob_and_entropy`; the test process computes the reference independently with
`torch.log_softmax` and `torch.distributions.Categorical` on the whole vocabulary and compares
values and the gradient w.r.t. the logits (shard gradients concatenated over the group).
Multi-rank checks share one spawn of 4 gloo ranks (TP=4, and two TP=2 groups side by side);
TP=1 runs in this process without any group.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import pytest
import torch

from erpo_mega.native import native_mode, native_status
from erpo_mega.parallel import vocab_parallel
from erpo_mega.parallel.spawn import run_distributed
from erpo_mega.parallel.vocab_parallel import _native_kernels, default_chunk_size, logprob_and_entropy

IGNORE = -100


@dataclass(frozen=True)
class Case:
    name: str
    lead: tuple[int, ...]  # leading (token) shape seen by the caller
    vocab: int
    dtype: torch.dtype = torch.float32
    temperature: float = 1.0
    chunk_size: int | None = None
    entropy_grad: bool = False
    masked: bool = False
    loss: str = "both"  # which outputs the upstream loss uses: both | logp | entropy
    seq_first: bool = False  # logits stored [S, B, V] (megatron's layout), passed as [B, S, V]
    neg_inf: bool = False  # some vocabulary entries are -inf
    seed: int = 0
    save_bytes: int | None = None  # None: the default budget keeps the fp32 softmax; 0: recompute
    inplace: bool = False  # inplace_grad: the gradient overwrites the logits


CASES = [
    Case("fp32_default_chunk", (3, 37), 96),
    Case("fp32_temp_mask_chunk16", (3, 37), 96, temperature=0.7, chunk_size=16, entropy_grad=True,
         masked=True, seed=1),
    Case("fp32_1d_chunk1", (50,), 96, temperature=1.3, chunk_size=1, entropy_grad=True, seed=2),
    Case("fp32_entropy_only", (2, 21), 96, chunk_size=5, entropy_grad=True, loss="entropy", seed=3),
    Case("fp32_logp_only_detached_entropy", (2, 21), 96, chunk_size=8, loss="logp", seed=4),
    Case("fp32_seq_first_layout", (4, 9), 96, temperature=0.6, chunk_size=10, entropy_grad=True,
         masked=True, seq_first=True, seed=5),
    Case("fp32_neg_inf_entries", (2, 15), 96, chunk_size=7, entropy_grad=True, neg_inf=True, seed=6),
    Case("bf16_large_vocab", (4, 25), 1024, dtype=torch.bfloat16, temperature=0.9, chunk_size=7,
         entropy_grad=True, masked=True, seed=7),
    # backward recomputes the softmax instead of keeping it (byte budget 0)
    Case("fp32_recompute_temp_mask", (3, 37), 96, temperature=0.7, chunk_size=16, entropy_grad=True,
         masked=True, seed=8, save_bytes=0),
    Case("fp32_recompute_neg_inf", (2, 15), 96, temperature=1.2, chunk_size=7, entropy_grad=True, neg_inf=True,
         seed=9, save_bytes=0),
    Case("fp32_recompute_logp_only", (2, 21), 96, chunk_size=8, loss="logp", seed=10, save_bytes=0),
    Case("fp32_kept_neg_inf_logp_only", (2, 15), 96, chunk_size=4, loss="logp", neg_inf=True, seed=11),
    # the gradient written into the logits' own storage
    Case("fp32_inplace_temp_mask", (3, 37), 96, temperature=0.7, chunk_size=16, entropy_grad=True, masked=True,
         seed=12, inplace=True),
    Case("fp32_inplace_seq_first_neg_inf", (4, 9), 96, temperature=1.3, entropy_grad=True, seq_first=True,
         neg_inf=True, seed=13, inplace=True),
    Case("fp32_inplace_logp_only_odd_vocab", (2, 21), 100, chunk_size=8, loss="logp", seed=14, inplace=True),
    Case("bf16_inplace", (4, 25), 1024, dtype=torch.bfloat16, temperature=0.9, chunk_size=7, entropy_grad=True,
         masked=True, seed=15, inplace=True),
]


def build_inputs(case: Case, data_seed: int = 0):
    """Full-vocabulary inputs for a case, identical on every rank (pure function of the seed)."""
    g = torch.Generator().manual_seed(1000 * case.seed + data_seed)
    shape = (*case.lead, case.vocab)
    # Per-token scales from near-uniform to very peaked, so the winning max sits on different ranks.
    scale = torch.tensor([0.05, 1.0, 4.0, 40.0])[torch.randint(0, 4, case.lead, generator=g)]
    logits = torch.randn(shape, generator=g) * scale[..., None] + torch.randn(shape[-1:], generator=g)
    targets = torch.randint(0, case.vocab, case.lead, generator=g)
    mask = torch.rand(case.lead, generator=g) > 0.3 if case.masked else None
    if mask is not None:
        targets = torch.where(mask, targets, IGNORE)
    if case.neg_inf:
        banned = torch.rand(shape, generator=g) < 0.3
        banned[..., : case.vocab // 4] = True  # a whole shard at TP=4 for every token
        banned.scatter_(-1, targets.clamp(min=0)[..., None], False)  # targets stay reachable
        logits = logits.masked_fill(banned, float("-inf"))
    logits = logits.to(case.dtype)
    g_logp = torch.randn(case.lead, generator=g)
    g_entropy = torch.randn(case.lead, generator=g)
    return logits, targets, mask, g_logp, g_entropy


def run_case(case: Case, rank: int, world: int, tp_group=None, data_seed: int = 0, device: str = "cpu") -> dict:
    """This rank's part: outputs and the gradient of its logits shard (results back on the CPU)."""
    logits, targets, mask, g_logp, g_entropy = (None if t is None else t.to(device)
                                                for t in build_inputs(case, data_seed))
    vs = case.vocab // world
    shard = logits[..., rank * vs:(rank + 1) * vs]
    if case.seq_first:
        leaf = shard.transpose(0, 1).contiguous().requires_grad_()
        shard_in = leaf.transpose(0, 1)
    else:
        leaf = shard.contiguous().requires_grad_()
        shard_in = leaf
    before = leaf.detach().clone()
    logp, entropy = logprob_and_entropy(shard_in, targets, tp_group=tp_group, temperature=case.temperature,
                                        chunk_size=case.chunk_size, entropy_grad=case.entropy_grad, mask=mask,
                                        save_bytes=case.save_bytes, inplace_grad=case.inplace)
    unchanged_after_forward = torch.equal(leaf.detach(), before)
    loss = 0.0
    if case.loss in ("both", "logp"):
        loss = loss + (logp * g_logp).sum()
    if case.loss in ("both", "entropy") and case.entropy_grad:
        loss = loss + (entropy * g_entropy).sum()
    loss.backward()
    grad = leaf.grad.transpose(0, 1) if case.seq_first else leaf.grad
    return {
        "logp": logp.detach().cpu(), "entropy": entropy.detach().cpu(), "grad": grad.contiguous().cpu(),
        "entropy_requires_grad": entropy.requires_grad, "logp_dtype": logp.dtype,
        # in place, the logits' storage ends up holding the gradient; otherwise it is never written
        "unchanged": unchanged_after_forward and (torch.equal(leaf.detach(), leaf.grad) if case.inplace
                                                  else torch.equal(leaf.detach(), before)),
    }


def reference(case: Case, data_seed: int = 0):
    """Full-vocabulary float64 values and gradient, no sharding involved."""
    logits, targets, mask, g_logp, g_entropy = build_inputs(case, data_seed)
    # -inf -> -1e4 keeps every float64 probability (exp underflows to exactly 0) and lets the
    # Categorical entropy backward stay finite (it is NaN at -inf).
    z = logits.double().clamp(min=-1e4).requires_grad_()
    x = z / case.temperature
    active = torch.ones(case.lead, dtype=torch.bool) if mask is None else mask
    logp = torch.log_softmax(x, dim=-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    entropy = torch.distributions.Categorical(logits=x).entropy()
    logp = torch.where(active, logp, 0.0)
    entropy = torch.where(active, entropy, 0.0)
    loss = 0.0
    if case.loss in ("both", "logp"):
        loss = loss + (logp * g_logp.double()).sum()
    if case.loss in ("both", "entropy") and case.entropy_grad:
        loss = loss + (entropy * g_entropy.double()).sum()
    (grad,) = torch.autograd.grad(loss, z)
    return logp.detach(), entropy.detach(), grad


def check_against_reference(case: Case, parts: list[dict], data_seed: int = 0, where: str = ""):
    """Assert every rank's outputs equal the reference and the concatenated grads match it."""
    ref_logp, ref_entropy, ref_grad = reference(case, data_seed)
    label = f"{case.name}{where}"
    for r, part in enumerate(parts):
        assert part["unchanged"], f"{label}: rank {r} logits were modified"
        assert part["entropy_requires_grad"] == case.entropy_grad, label
        assert part["logp_dtype"] == torch.float32, label
        for key, ref in (("logp", ref_logp), ("entropy", ref_entropy)):
            where_ = f"{label} {key} rank {r}"
            torch.testing.assert_close(part[key].double(), ref, rtol=1e-5, atol=2e-5,
                                       msg=lambda m, w=where_: f"{w}: {m}")
    grad = torch.cat([p["grad"] for p in parts], dim=-1)
    assert grad.dtype == case.dtype, label
    if case.dtype == torch.float32:
        tol = {"rtol": 1e-5, "atol": 5e-6}
    else:  # each grad element is rounded once to bf16 (8 bits of mantissa)
        tol = {"rtol": 2**-7, "atol": 1e-6}
    torch.testing.assert_close(grad.double(), ref_grad, **tol, msg=lambda m: f"{label} grad: {m}")


def check_errors(rank: int, world: int, tp_group) -> list[str]:
    """Bad input raises a ValueError naming the argument on every rank (no rank hangs)."""
    vs = 8
    logits = torch.randn(2, 3, vs)
    ok_targets = torch.zeros(2, 3, dtype=torch.long)
    bad = {
        "target_ids": dict(target_ids=torch.full((2, 3), vs * world)),  # = V, one past the end
        "target_ids ": dict(target_ids=torch.full((2, 3), IGNORE)),  # padding id without a mask
        "target_ids  ": dict(target_ids=torch.zeros(2, 4, dtype=torch.long)),
        "target_ids   ": dict(target_ids=torch.zeros(2, 3)),
        "temperature": dict(temperature=0.0),
        "mask": dict(mask=torch.ones(3, 2, dtype=torch.bool)),
        "chunk_size": dict(chunk_size=0),
        "save_bytes": dict(save_bytes=-1),
        "inplace_grad": dict(inplace_grad=1),
    }
    failures = []
    for field, kwargs in bad.items():
        args = {"target_ids": ok_targets, **kwargs}
        try:
            logprob_and_entropy(logits, tp_group=tp_group, **args)
            failures.append(f"{field.strip()}: no error for {kwargs}")
        except ValueError as e:
            if field.strip() not in str(e):
                failures.append(f"{field.strip()}: error does not name it: {e}")
    return failures


# ---------------------------------------------------------------- spawned workers


def _restore_env(name: str, value: str | None) -> None:
    import os

    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _worker_world4() -> dict:
    """Every multi-rank configuration in one spawn of 4 ranks (importing megatron costs ~7 s a rank)."""
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from erpo_mega.parallel.dist import destroy_distributed, init_distributed

    init_distributed(tp=4)
    rank = dist.get_rank()
    out = {"rank": rank, "native": _native_kernels() is not None}
    # megatron TP=4, found through parallel_state (tp_group=None); native kernels and torch path.
    out["tp4"] = {c.name: run_case(c, rank, 4) for c in CASES}
    mode = os.environ.get("ERPO_NATIVE")
    os.environ["ERPO_NATIVE"] = "0"
    out["tp4_torch"] = {c.name: run_case(c, rank, 4) for c in CASES}
    _restore_env("ERPO_NATIVE", mode)
    out["errors"] = check_errors(rank, 4, None)
    # A plain ProcessGroup passed explicitly: the default (world) group.
    out["tp4_world_group"] = {c.name: run_case(c, rank, 4, tp_group=dist.group.WORLD) for c in CASES[:2]}
    # megatron TP=2 x DP=2: two TP groups run at once on different data; neither may see the other's.
    init_distributed(tp=2)
    tp_rank, dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
    out["tp2"] = {"g_rank": tp_rank, "data_seed": dp_rank,
                  "cases": {c.name: run_case(c, tp_rank, 2, data_seed=dp_rank) for c in CASES}}
    os.environ["ERPO_NATIVE"] = "0"
    out["tp2_torch"] = {"g_rank": tp_rank, "data_seed": dp_rank,
                        "cases": {c.name: run_case(c, tp_rank, 2, data_seed=dp_rank) for c in CASES}}
    _restore_env("ERPO_NATIVE", mode)
    out["tp2_errors"] = check_errors(tp_rank, 2, None)
    # Plain new_group()s over non-adjacent ranks, passed explicitly.
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    mine = groups[rank % 2]
    g_rank = dist.get_rank(mine)
    out["tp2_new_group"] = {"g_rank": g_rank, "data_seed": rank % 2,
                            "cases": {c.name: run_case(c, g_rank, 2, tp_group=mine, data_seed=rank % 2)
                                      for c in CASES[:4]}}
    try:
        logprob_and_entropy(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), tp_group=groups[(rank + 1) % 2])
        out["non_member"] = "no error"
    except ValueError as e:
        out["non_member"] = str(e)
    destroy_distributed()
    return out


# ---------------------------------------------------------------- tests


@pytest.fixture(params=["native", "native_no_avx512", "torch"])
def kernel_path(request, monkeypatch):
    """Run a test on the native C kernels (fp32 CPU), on their generic-vector build (what an x86 CPU
    without AVX-512 runs) and on the torch path (`ERPO_NATIVE=0`)."""
    if request.param == "torch":
        monkeypatch.setenv("ERPO_NATIVE", "0")
        assert _native_kernels() is None
        return request.param
    if request.param == "native_no_avx512":
        if platform.machine().lower() not in ("x86_64", "amd64"):
            pytest.skip("x86 only")
        monkeypatch.setattr(vocab_parallel, "_NATIVE_CFLAGS", (*vocab_parallel._NATIVE_CFLAGS, "-mno-avx512f"))
    _require_native()
    return request.param


def _require_native() -> None:
    """Skip without a C compiler or with ERPO_NATIVE=0; any other reason the kernels are missing (a
    build error) fails."""
    if _native_kernels() is None:
        status = native_status("logprob_entropy")
        if "no C compiler" in status or native_mode() == "off":
            pytest.skip(f"native kernel unavailable: {status}")
        pytest.fail(f"native kernel unavailable: {status}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_tp1_matches_full_vocab_reference(case, kernel_path):
    check_against_reference(case, [run_case(case, rank=0, world=1)])


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in CASES if c.name in (
    "fp32_temp_mask_chunk16", "fp32_neg_inf_entries", "bf16_large_vocab", "fp32_recompute_temp_mask")],
    ids=lambda c: c.name)
def test_tp1_on_cuda_matches_full_vocab_reference(case):
    check_against_reference(case, [run_case(case, rank=0, world=1, device="cuda")])


def test_tp1_errors_name_the_argument(kernel_path):
    assert check_errors(0, 1, None) == []


def test_masked_positions_accept_any_id_and_get_zero():
    logits = torch.randn(4, 10, requires_grad=True)
    targets = torch.tensor([3, IGNORE, 10_000, 9])
    mask = torch.tensor([True, False, False, True])
    logp, entropy = logprob_and_entropy(logits, targets, mask=mask, entropy_grad=True)
    assert logp[1] == 0 and logp[2] == 0 and entropy[1] == 0 and entropy[2] == 0
    (logp.sum() + entropy.sum()).backward()
    assert torch.all(logits.grad[1:3] == 0) and torch.all(logits.grad[[0, 3]] != 0)


def test_hand_computed_two_token_vocab():
    # logits (0, log 3): p = (1/4, 3/4); logp(1) = log(3/4); H = -(1/4 log 1/4 + 3/4 log 3/4)
    logits = torch.tensor([[0.0, float(torch.log(torch.tensor(3.0)))]])
    logp, entropy = logprob_and_entropy(logits, torch.tensor([1]))
    assert logp.item() == pytest.approx(-0.2876821, abs=1e-6)
    assert entropy.item() == pytest.approx(0.5623351, abs=1e-6)


def test_default_chunk_size_follows_budget():
    assert default_chunk_size(1000, budget_bytes=2 * 4 * 1000 * 7) == 7
    assert default_chunk_size(10**9, budget_bytes=1) == 1


def _assert_parts(results_by_rank: dict, cases, data_seed=0, where=""):
    for case in cases:
        parts = [results_by_rank[r][case.name] for r in range(len(results_by_rank))]
        check_against_reference(case, parts, data_seed, where)


@pytest.fixture(scope="module")
def world4():
    """One spawn of 4 gloo ranks shared by the multi-rank tests below."""
    return run_distributed(_worker_world4, 4)


def test_tp4_megatron_group(world4):
    assert [r["errors"] for r in world4] == [[]] * 4
    _assert_parts({r["rank"]: r["tp4"] for r in world4}, CASES, where=" [tp4 megatron]")
    _assert_parts({r["rank"]: r["tp4_torch"] for r in world4}, CASES, where=" [tp4 megatron, torch path]")


def test_spawned_ranks_ran_the_native_kernels(world4):
    _require_native()
    assert all(r["native"] for r in world4)


def test_tp4_plain_world_group(world4):
    _assert_parts({r["rank"]: r["tp4_world_group"] for r in world4}, CASES[:2], where=" [tp4 WORLD]")


@pytest.mark.parametrize("config", ["tp2", "tp2_torch", "tp2_new_group"])
def test_tp2_groups_side_by_side(world4, config):
    """Two TP=2 groups with different data (megatron TP2xDP2; new_group over ranks {0,2},{1,3})."""
    assert [r["tp2_errors"] for r in world4] == [[]] * 4
    for data_seed in (0, 1):
        members = [r[config] for r in world4 if r[config]["data_seed"] == data_seed]
        by_rank = {m["g_rank"]: m["cases"] for m in members}
        assert sorted(by_rank) == [0, 1], f"{config}: group ranks {sorted(by_rank)}"
        cases = [c for c in CASES if c.name in by_rank[0]]
        _assert_parts(by_rank, cases, data_seed, where=f" [{config} data {data_seed}]")


def test_group_without_this_rank_is_an_error(world4):
    assert all(r["non_member"].startswith("tp_group:") for r in world4), [r["non_member"] for r in world4]


def _live_storage_bytes_mode():
    """The benchmark's allocation tracker (tools/ is not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "bench_logprob_entropy.py"
    spec = importlib.util.spec_from_file_location("bench_logprob_entropy", path)
    module = sys.modules.get(spec.name) or importlib.util.module_from_spec(spec)
    if spec.name not in sys.modules:
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return module.LiveStorageBytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extra_memory_is_bounded_by_the_chunk_not_the_sequence(dtype, kernel_path):
    tokens, vocab, chunk = 512, 256, 16
    logits = torch.randn(tokens, vocab).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))
    with _live_storage_bytes_mode() as mode:
        logp, entropy = logprob_and_entropy(logits, targets, chunk_size=chunk, entropy_grad=True)
        (logp.sum() + entropy.sum()).backward()
    grad_bytes = logits.numel() * logits.element_size()
    working = 2 * chunk * vocab * 4  # two fp32 chunk buffers
    per_token = 128 * tokens  # targets, masks and fp32 per-token statistics
    # A full-vocabulary fp32 softmax alone would be tokens * vocab * 4 = 512 KiB beyond the gradient.
    assert mode.peak <= grad_bytes + working + per_token, (mode.peak, grad_bytes, working, per_token)
    assert mode.peak >= grad_bytes  # the tracker does see the gradient


@pytest.mark.parametrize("save_bytes", [None, 0])
def test_second_backward_with_retained_graph_gives_the_same_gradient(save_bytes, kernel_path):
    """The kept softmax becomes the first gradient; a second backward must recompute, not reuse it."""
    logits = torch.randn(6, 40, requires_grad=True)
    targets = torch.randint(0, 40, (6,))
    logp, entropy = logprob_and_entropy(logits, targets, entropy_grad=True, chunk_size=4, save_bytes=save_bytes)
    loss = (logp * torch.arange(6.0)).sum() + entropy.sum()
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    loss.backward()
    torch.testing.assert_close(logits.grad, 2 * first)


@pytest.mark.parametrize("save_bytes, kept", [(None, True), (512 * 64 * 4, True), (512 * 64 * 4 - 1, False),
                                              (0, False)])
def test_softmax_is_kept_between_forward_and_backward_only_within_the_byte_budget(save_bytes, kept, monkeypatch):
    monkeypatch.setenv("ERPO_NATIVE", "0")  # the torch path's choice; the native kernels always recompute
    tokens, vocab = 512, 64
    logits = torch.randn(tokens, vocab, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    with _live_storage_bytes_mode() as mode:
        logp, _ = logprob_and_entropy(logits, targets, chunk_size=16, save_bytes=save_bytes)
        held = mode.current  # bytes alive between forward and backward
        logp.sum().backward()
    softmax_bytes = tokens * vocab * 4
    assert (held >= softmax_bytes) == kept, (held, softmax_bytes)
    assert mode.peak <= softmax_bytes + 2 * 16 * vocab * 4 + 128 * tokens  # kept softmax becomes the grad


def test_native_kernels_keep_nothing_between_forward_and_backward():
    _require_native()
    tokens, vocab = 512, 64
    logits = torch.randn(tokens, vocab, requires_grad=True)
    with _live_storage_bytes_mode() as mode:
        logp, entropy = logprob_and_entropy(logits, torch.randint(0, vocab, (tokens,)), entropy_grad=True)
        held = mode.current
        (logp.sum() + entropy.sum()).backward()
    assert held < 64 * tokens, held  # per-token statistics only
    assert mode.peak <= tokens * vocab * 4 + 128 * tokens, mode.peak  # the gradient + per-token values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_gradient_allocates_no_gradient_buffer(dtype, kernel_path):
    tokens, vocab, chunk = 512, 256, 16
    logits = torch.randn(tokens, vocab).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))
    with _live_storage_bytes_mode() as mode:
        logp, entropy = logprob_and_entropy(logits, targets, chunk_size=chunk, entropy_grad=True, inplace_grad=True)
        (logp.sum() + entropy.sum()).backward()
    grad_bytes = logits.numel() * logits.element_size()
    assert mode.peak <= 2 * chunk * vocab * 4 + 128 * tokens < grad_bytes, (mode.peak, grad_bytes)
    assert torch.equal(logits.detach(), logits.grad)  # the logits' storage holds the gradient


def test_inplace_gradient_fails_loudly_when_another_node_saved_the_logits(kernel_path):
    leaf = torch.randn(8, 40, requires_grad=True)
    logits = leaf * 1.0
    other = torch.sin(logits)  # saves its input for backward; runs after ours in backward
    logp, _ = logprob_and_entropy(logits, torch.randint(0, 40, (8,)), inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logp.sum() + other.sum()).backward()


def test_inplace_gradient_second_backward_fails_loudly(kernel_path):
    logits = torch.randn(6, 40) * 1.0
    leaf = logits.clone().requires_grad_()
    x = leaf * 1.0
    logp, _ = logprob_and_entropy(x, torch.randint(0, 40, (6,)), inplace_grad=True)
    logp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp.sum().backward()


def test_inplace_gradient_is_ignored_for_logits_that_are_not_a_view(kernel_path):
    """[2, 3, V] sliced from [2, 4, V] cannot be viewed as [6, V]: the function works on a copy, so
    writing into it would lose the gradient; it falls back to a fresh buffer and leaves the logits."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 4, 50, generator=g)
    targets = torch.randint(0, 50, (2, 3), generator=g)
    leaf = base.clone().requires_grad_()
    logits = leaf[:, :3]
    logp, entropy = logprob_and_entropy(logits, targets, entropy_grad=True, inplace_grad=True)
    (logp.sum() + entropy.sum()).backward()
    assert torch.equal(leaf.detach(), base)
    ref = base.double()[:, :3].requires_grad_()
    log_p = torch.log_softmax(ref, -1)
    (log_p.gather(-1, targets[..., None]).sum() - (log_p.exp() * log_p).sum()).backward()
    torch.testing.assert_close(leaf.grad[:, :3].double(), ref.grad, rtol=1e-5, atol=5e-6)
    assert torch.all(leaf.grad[:, 3] == 0)


@pytest.mark.parametrize("inplace", [False, True])
def test_native_rows_split_over_threads_match_the_reference(inplace, monkeypatch):
    """Rows go to 3 threads (uneven ranges) even at this small size: same values as the reference."""
    _require_native()
    monkeypatch.setattr(vocab_parallel, "_NATIVE_MIN_ROW_ELEMENTS", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        case = Case("threads", (5, 7), 96, temperature=0.8, entropy_grad=True, masked=True, neg_inf=True, seed=16,
                    inplace=inplace)
        check_against_reference(case, [run_case(case, rank=0, world=1)])
    finally:
        torch.set_num_threads(threads)


def test_inplace_gradient_is_ignored_for_expanded_logits(kernel_path):
    """Rows of an expanded tensor share memory: writing each row's gradient there would be garbage."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(1, 40, generator=g)
    targets = torch.randint(0, 40, (5,), generator=g)
    leaf = base.clone().requires_grad_()
    logp, entropy = logprob_and_entropy(leaf.expand(5, 40), targets, entropy_grad=True, inplace_grad=True)
    (logp.sum() + entropy.sum()).backward()
    assert torch.equal(leaf.detach(), base)
    ref = base.double().requires_grad_()
    log_p = torch.log_softmax(ref.expand(5, 40), -1)
    (log_p.gather(-1, targets[:, None]).sum() - (log_p.exp() * log_p).sum()).backward()
    torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=1e-5, atol=5e-6)


def test_no_softmax_is_kept_without_grad():
    logits = torch.randn(512, 64)
    with _live_storage_bytes_mode() as mode:
        logprob_and_entropy(logits, torch.randint(0, 64, (512,)), chunk_size=16)
    assert mode.peak < 512 * 64 * 4, mode.peak


@pytest.mark.parametrize("save_bytes, inplace", [(None, False), (0, False), (None, True)])
def test_large_vocabulary_keeps_fp32_summation_accuracy(save_bytes, inplace, kernel_path):
    """At 65k entries a single running fp32 sum of the exps drifts by ~4e-6 relative; the entropy
    and gradient must stay at cascaded-sum accuracy (errors below 2e-6 against float64)."""
    g = torch.Generator().manual_seed(5)
    tokens, vocab = 48, 65536
    scale = torch.tensor([0.05, 1.0, 4.0, 40.0])[torch.arange(tokens) % 4]
    z = torch.randn(tokens, vocab, generator=g) * scale[:, None] + 3 * torch.randn(vocab, generator=g)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    g1, g2 = torch.randn(tokens, generator=g), torch.randn(tokens, generator=g)
    x = z.clone().requires_grad_()
    logp, entropy = logprob_and_entropy(x, targets, entropy_grad=True, save_bytes=save_bytes, inplace_grad=inplace)
    ((logp * g1).sum() + (entropy * g2).sum()).backward()
    zd = z.double().requires_grad_()
    log_p = torch.log_softmax(zd, -1)
    ref_entropy = -(log_p.exp() * log_p).sum(-1)
    ref_logp = log_p.gather(1, targets[:, None]).squeeze(1)
    ((ref_logp * g1.double()).sum() + (ref_entropy * g2.double()).sum()).backward()
    assert float((entropy.detach().double() - ref_entropy.detach()).abs().max()) < 2e-6
    assert float((x.grad.double() - zd.grad).abs().max()) < 2e-6
    # logp is limited by fp32 logits of magnitude ~150 themselves (ulp 1.5e-5)
    torch.testing.assert_close(logp.detach().double(), ref_logp.detach(), rtol=1e-6, atol=2e-5)
