"""The engine's C decode kernels (`native/src/engine_kernels.c`) against plain float64 references.

Each kernel is checked on random shapes (ragged cache lengths, GQA groups, head sizes with and
without the unrolled paths, -inf logits), then the whole native decode step against the torch
path (ERPO_NATIVE=0) and with its rows split over worker threads.
"""

import math
from pathlib import Path

import pytest
import torch

from erpo_mega.models import engine_native
from erpo_mega.models.torch_llm import RowWorkers, TorchLLM, rope_cos_sin
from erpo_mega.native import load_library, native_status
from erpo_mega.rollout.engine.runner import BatchRunner, Sequence, run_batch
from erpo_mega.rollout.protocol import parse_sampling_params
from tests.rollout.helpers import save_tiny_model


@pytest.fixture(params=["native", "no-avx512"])
def ek(request):
    """The kernels as the engine builds them, and (on x86 with AVX-512) a build without it, so the
    generic vector code paths are checked too."""
    kernels = engine_native.kernels()
    if kernels is None:
        pytest.skip("native kernels unavailable here (no compiler or ERPO_NATIVE=0)")
    if request.param == "native":
        return kernels
    if "avx512f" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("no AVX-512 here: the native build is already the generic one")
    lib = load_library("engine_kernels", extra_cflags=("-mno-avx512f",))
    assert lib is not None, native_status("engine_kernels")
    return engine_native.EngineKernels(lib)


@pytest.fixture
def native_on():
    """Model-level tests: the engine's own kernels must be there (they then compare paths)."""
    if engine_native.kernels() is None:
        pytest.skip("native kernels unavailable here (no compiler or ERPO_NATIVE=0)")


def _rope64(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def test_rmsnorm_and_silu_mul(ek):
    g = torch.Generator().manual_seed(0)
    for rows, h in [(1, 8), (7, 128), (33, 200)]:
        x = torch.randn(rows, h, generator=g) * 3
        w = torch.randn(h, generator=g)
        ref = (w.double() * x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)).float()
        torch.testing.assert_close(ek.rmsnorm(x, w, 1e-6), ref, atol=1e-5, rtol=1e-5)
    gu = torch.randn(9, 2 * 77, generator=g) * 4
    gu[0, :5] = torch.tensor([-200.0, -90.0, 0.0, 90.0, 200.0])   # exp under/overflow inside silu
    gate, up = gu.double().chunk(2, -1)
    ref = (gate * torch.sigmoid(gate) * up).float()
    torch.testing.assert_close(ek.silu_mul(gu), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="gate_up"):
        ek.silu_mul(gu.double())


@pytest.mark.parametrize("nh,nkv,d", [(4, 2, 32), (8, 1, 64), (2, 2, 128), (6, 3, 24)])
def test_decode_attention_ragged_gqa(ek, nh, nkv, d):
    g = torch.Generator().manual_seed(nh * 100 + d)
    b, cap, slots = 5, 40, 7
    pos = torch.tensor([0, 3, 39, 17, 1])
    qkv = torch.randn(b, (nh + 2 * nkv) * d, generator=g)
    kc = torch.randn(slots, nkv, cap, d, generator=g)
    vc = torch.randn(slots, nkv, cap, d, generator=g)
    k_before, v_before = kc.clone(), vc.clone()
    cos, sin = rope_cos_sin(torch.arange(64)[None], d, 10000.0)
    cos, sin = cos[0].contiguous(), sin[0].contiguous()
    out = ek.decode_attention(qkv, nh, nkv, d, cos, sin, pos, kc, vc, d ** -0.5)
    # reference in float64: rope, write, attend over [0, pos] of the slot, per query head
    q, k, v = qkv.double().split([nh * d, nkv * d, nkv * d], -1)
    ref = torch.empty(b, nh * d, dtype=torch.float64)
    kref, vref = k_before.double(), v_before.double()
    for r in range(b):
        p = int(pos[r])
        c, s = cos[p].double(), sin[p].double()
        kref[r, :, p] = _rope64(k[r].view(nkv, d), c, s)
        vref[r, :, p] = v[r].view(nkv, d)
        for hq in range(nh):
            kv = hq // (nh // nkv)
            qr = _rope64(q[r].view(nh, d)[hq], c, s)
            w = torch.softmax(kref[r, kv, : p + 1] @ qr / math.sqrt(d), -1)
            ref[r, hq * d:(hq + 1) * d] = w @ vref[r, kv, : p + 1]
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(kc.double(), kref, atol=1e-5, rtol=1e-5)   # only [r, :, pos[r]] changed
    torch.testing.assert_close(vc.double(), vref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="positions"):
        ek.decode_attention(qkv, nh, nkv, d, cos, sin, torch.tensor([0, 3, 40, 1, 1]), kc, vc, 0.1)


def test_sample_greedy_draws_and_banned_tokens(ek):
    g = torch.Generator().manual_seed(3)
    b, v = 64, 1000
    logits = torch.randn(b, v, generator=g) * 3
    logits[::3, 10:900] = float("-inf")           # banned ranges
    logits[5, :] = float("-inf")
    logits[5, 777] = 1.0                          # one allowed token
    logits[7, 3] = logits[7, 4] = 50.0            # tie: greedy takes the first
    greedy = torch.tensor([i % 4 == 0 or i == 7 for i in range(b)], dtype=torch.uint8)
    temps = torch.rand(b, generator=g) + 0.3
    u = torch.rand(b, generator=g, dtype=torch.float64)
    u[1], u[2] = 0.0, 1 - 1e-12
    tokens, lps = ek.sample(logits, temps, greedy, u)
    for r in range(b):
        t = 1.0 if greedy[r] else float(temps[r])
        s = logits[r].double() / t
        lsm = torch.log_softmax(s, -1)
        if greedy[r]:
            assert int(tokens[r]) == int(torch.argmax(logits[r])), r
        else:
            p = lsm.exp()
            cdf = p.cumsum(0)
            want = int(torch.searchsorted(cdf, float(u[r]) * cdf[-1], right=True).clamp(max=v - 1))
            while p[want] == 0:                   # the reference never lands on a zero-probability entry
                want -= 1
            assert int(tokens[r]) == want, (r, int(tokens[r]), want)
        assert torch.isfinite(logits[r, int(tokens[r])])
        assert abs(float(lps[r]) - float(lsm[int(tokens[r])])) < 1e-4
    assert int(tokens[5]) == 777 and int(tokens[7]) == 3
    none = torch.full((1, v), float("-inf"))
    assert int(ek.sample(none, temps[:1], greedy[:1], u[:1])[0][0]) == -1


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("native_model")
    save_tiny_model(path, "qwen2", seed=11)
    return TorchLLM.from_hf_dir(path)


def _seqs(n_new=12, temperature=0.8):
    prompts = [[5, 17, 33, 8], [9, 4], [60, 61, 62, 63, 64, 65, 66], [9, 4], [3] * 15, [7, 8, 9]] * 3
    return [Sequence(rid=f"r{i}", prompt_ids=p, generator=torch.Generator().manual_seed(i), stop_ids=set(),
                     params=parse_sampling_params({"max_new_tokens": n_new + i % 5, "temperature": temperature}),
                     max_new_tokens=n_new + i % 5) for i, p in enumerate(prompts)]


def test_native_step_equals_torch_path_and_row_split(native_on, model, monkeypatch):
    """Decode logits: native vs ERPO_NATIVE=0 vs native with rows over 3 threads; then whole runs
    (greedy tokens equal, seeded sampling equal up to the kernels' rounding)."""
    prompts = [[5, 17, 33, 8], [9, 4, 4, 4, 4, 4], [60, 61, 62], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    logits = {}
    for mode in ("torch", "native", "split"):
        monkeypatch.setenv("ERPO_NATIVE", "0" if mode == "torch" else "1")
        model.row_workers = RowWorkers(3) if mode == "split" else None
        runner = BatchRunner(model)
        runner.admit([Sequence(rid="x", prompt_ids=p, generator=torch.Generator(), stop_ids=set(),
                               params=parse_sampling_params({"max_new_tokens": 4, "temperature": 0}),
                               max_new_tokens=4) for p in prompts * 2])
        tokens = torch.tensor([s.output_ids[-1] for s in runner.seqs])
        with torch.no_grad():
            logits[mode] = [model.decode_slots(tokens, runner.cache), model.decode_slots(tokens, runner.cache)]
    model.row_workers = None
    for mode in ("native", "split"):
        for a, b in zip(logits[mode], logits["torch"]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

    runs = {}
    for mode in ("torch", "native", "split"):
        monkeypatch.setenv("ERPO_NATIVE", "0" if mode == "torch" else "1")
        model.row_workers = RowWorkers(2) if mode == "split" else None
        greedy, sampled = _seqs(temperature=0), _seqs()
        run_batch(model, greedy)
        run_batch(model, sampled)
        runs[mode] = greedy, sampled
    model.row_workers = None
    for mode in ("native", "split"):
        for a, b in zip(runs[mode][0], runs["torch"][0]):
            assert a.output_ids == b.output_ids
            torch.testing.assert_close(torch.tensor(a.output_logprobs), torch.tensor(b.output_logprobs),
                                       atol=1e-4, rtol=1e-4)
        same = sum(a.output_ids == b.output_ids for a, b in zip(runs[mode][1], runs["torch"][1]))
        assert same == len(runs["torch"][1])   # inverse-CDF draws: equal unless u lands on a rounding edge
    assert [s.output_ids for s in runs["split"][1]] == [s.output_ids for s in runs["native"][1]]


def test_row_workers_propagate_errors():
    workers = RowWorkers(2)

    def fn(r0, r1):
        if r0 > 0:
            raise RuntimeError("part two failed")
        return r1 - r0

    with pytest.raises(RuntimeError, match="part two"):
        workers.run(fn, 16)
    assert workers.run(lambda r0, r1: (r0, r1), 16) == [(0, 8), (8, 16)]
    assert workers.run(lambda r0, r1: (r0, r1), 5) == [(0, 5)]   # too few rows to split


def test_unsupported_inputs_are_clear_errors(ek):
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight"):
        ek.rmsnorm(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        ek.rmsnorm(x.t(), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match="uniforms"):
        ek.sample(x, torch.ones(4), torch.zeros(4, dtype=torch.uint8), torch.zeros(4))


@pytest.mark.parametrize("chunk", [64, 5, None])
def test_native_prefill_equals_torch_prefill(native_on, model, monkeypatch, chunk):
    """Prompts as flat token rows (slot per row) give the torch path's hidden states and cache:
    one `ek_prefill_rows` call (12 rows in one chunk, or in chunks of 5 that split prompts, whose
    later chunks attend to keys an earlier chunk wrote) and the per-op path (chunk None)."""
    if chunk is None:
        monkeypatch.setattr(model, "fused_step", False)
    else:
        monkeypatch.setattr(model, "PREFILL_CHUNK", chunk)
    ids = torch.tensor([[5, 17, 33, 8, 0, 0], [9, 4, 4, 4, 4, 4], [60, 61, 0, 0, 0, 0]])
    lengths, slots = torch.tensor([4, 6, 2]), torch.tensor([2, 0, 1])
    out = {}
    for mode in ("torch", "native"):
        monkeypatch.setenv("ERPO_NATIVE", "0" if mode == "torch" else "1")
        cache = model.new_slot_cache(4, 16)
        cache.active = 3
        with torch.no_grad():
            out[mode] = model.prefill_slots(ids, lengths, cache, slots), cache
    valid = torch.arange(6)[None] < lengths[:, None]
    torch.testing.assert_close(out["native"][0][valid], out["torch"][0][valid], atol=1e-5, rtol=1e-5)
    (_, a), (_, b) = out["native"], out["torch"]
    assert a.lens.tolist() == b.lens.tolist() == [6, 2, 4, 0]
    for ka, kb, va, vb in zip(a.k, b.k, a.v, b.v):
        for slot, n in ((0, 6), (1, 2), (2, 4)):
            torch.testing.assert_close(ka[slot, :, :n], kb[slot, :, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(va[slot, :, :n], vb[slot, :, :n], atol=1e-5, rtol=1e-5)


def test_min_new_tokens_switches_paths_mid_run(native_on, model, monkeypatch):
    """Rows banning their stop token until min_new_tokens take the torch sampler, then the native
    one: outputs equal the all-torch run (the batch's reused step inputs stay in sync)."""
    def make():
        out = []
        for i, p in enumerate([[5, 17, 33, 8], [9, 4], [60, 61, 62]] * 3):
            sp = parse_sampling_params({"max_new_tokens": 12, "temperature": 0 if i % 2 else 0.9,
                                        "min_new_tokens": 3 + i % 4})
            out.append(Sequence(rid=f"m{i}", prompt_ids=p, params=sp, generator=torch.Generator().manual_seed(i),
                                stop_ids={7, 11, 23, 42}, max_new_tokens=12))
        return out

    runs = {}
    for mode in ("torch", "native"):
        monkeypatch.setenv("ERPO_NATIVE", "0" if mode == "torch" else "1")
        runs[mode] = make()
        run_batch(model, runs[mode])
    for a, b in zip(runs["native"], runs["torch"]):
        assert a.output_ids == b.output_ids and a.finish_reason == b.finish_reason
        assert len(a.output_ids) >= a.params.min_new_tokens
