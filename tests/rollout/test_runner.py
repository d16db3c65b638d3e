"""Continuous batching and batched sampling, against independent references.

References: transformers' forward over prompt + completion (greedy tokens and log-probs), the
same sequences generated alone (seeded sampling is batch-independent), and a plain float64
per-row re-implementation of SGLang's sampling order (bias, penalties, bans, temperature,
top-k/top-p/min-p, inverse CDF).
"""

import math

import pytest
import torch

from erpo_mega.models.torch_llm import TorchLLM
from erpo_mega.rollout.engine.runner import BatchRunner, Sequence, run_batch
from erpo_mega.rollout.engine.sampling import sample_batch
from erpo_mega.rollout.protocol import parse_sampling_params
from tests.rollout.helpers import save_tiny_model


@pytest.fixture(autouse=True, params=["native", "torch"])
def kernel_path(request, monkeypatch):
    """Every test here runs on the native decode kernels and on the plain-torch path (ERPO_NATIVE=0)."""
    from erpo_mega.models import engine_native

    if request.param == "torch":
        monkeypatch.setenv("ERPO_NATIVE", "0")
    elif engine_native.kernels() is None:
        pytest.skip("native kernels unavailable here")
    return request.param


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("runner_model")
    hf = save_tiny_model(path, "qwen2", seed=5)
    return hf, TorchLLM.from_hf_dir(path)


def seq(prompt, seed=0, n_new=8, **sp):
    params = parse_sampling_params({"max_new_tokens": n_new, **sp})
    return Sequence(rid=f"r{seed}", prompt_ids=list(prompt), params=params,
                    generator=torch.Generator().manual_seed(seed), stop_ids=set(), max_new_tokens=n_new)


def test_greedy_batch_with_shared_prompts_equals_transformers(models):
    hf, ours = models
    prompts = [[5, 17, 33, 8], [9, 4], [60, 61, 62, 63, 64, 65, 66], [9, 4], [9, 4]]  # [9, 4] x3: one prefill
    seqs = [seq(p, i, n_new=4 + 2 * i, temperature=0) for i, p in enumerate(prompts)]
    rows = []
    orig = ours.prefill_slots
    ours.prefill_slots = lambda ids, *a: (rows.append(ids.shape[0]), orig(ids, *a))[1]
    try:
        run_batch(ours, seqs)
    finally:
        del ours.prefill_slots
    assert rows == [3]  # three distinct prompts prefilled, the shared one once
    for p, s in zip(prompts, seqs):
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([p + s.output_ids])).logits[0, len(p) - 1:-1]
        assert s.output_ids == logits.argmax(-1).tolist()
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(s.output_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(s.output_logprobs), ref, atol=1e-4, rtol=1e-4)
        assert s.finish_reason == {"type": "length", "length": len(s.output_ids)}


def test_sequences_joining_and_leaving_equal_each_alone(models):
    """Staggered admission, early finishes (slot moves) and a cache that grows mid-run."""
    _, ours = models
    prompts = [[5, 17, 33, 8], [9, 4], [60, 61, 62, 63, 64, 65, 66], [9, 4], [11] * 20, [3, 4, 5]]
    lengths = [20, 3, 30, 9, 100, 1]
    make = lambda: [seq(p, 100 + i, n_new=n, temperature=0.9, top_p=0.95 if i % 2 else 1.0)  # noqa: E731
                    for i, (p, n) in enumerate(zip(prompts, lengths))]
    alone = []
    for s in make():
        run_batch(ours, [s])
        alone.append(s)
    runner = BatchRunner(ours)
    seqs = make()
    runner.admit(seqs[:2])
    for _ in range(2):
        runner.step()
    runner.admit(seqs[2:4])
    runner.step()
    runner.admit(seqs[4:])               # needs 120 slots of context: the cache grows while 3 run
    while runner.active:
        runner.step()
    for a, b in zip(alone, seqs):
        assert b.output_ids == a.output_ids and len(b.output_ids) == len(a.output_ids)
        torch.testing.assert_close(torch.tensor(b.output_logprobs), torch.tensor(a.output_logprobs),
                                   atol=1e-5, rtol=1e-5)


def test_multi_step_windows_equal_single_steps(models, kernel_path):
    """`step(max_steps=8)` (several decode steps per native call, over two row workers) gives the
    tokens and log-probs of single steps, also where a stop token ends a sequence inside a window
    and where length limits end them at different steps; greedy rows also equal transformers."""
    from erpo_mega.models.torch_llm import RowWorkers

    hf, ours = models
    lengths = [20, 3, 30, 9, 13, 1, 17, 26]

    def make(stop=None):
        out = [seq([5 + i, 17, 33, 2 * i + 1], 300 + i, n_new=n, temperature=0 if i < 2 else 0.8)
               for i, n in enumerate(lengths)]
        if stop is not None:
            out[2].stop_ids = {stop}
        return out

    def run(seqs, max_steps, workers=None):
        runner = BatchRunner(ours)
        ours.row_workers = workers
        windows = []
        orig = ours.decode_slots_steps
        ours.decode_slots_steps = lambda tokens, cache, head: (windows.append(head.steps), orig(tokens, cache, head))
        try:
            runner.admit(seqs)
            while runner.active:
                runner.step(max_steps)
        finally:
            ours.row_workers = None
            del ours.decode_slots_steps
        return windows

    base = make()
    run(base, 1)
    stop = base[2].output_ids[6]                 # a token sequence 2 draws mid-run
    single, multi = make(stop), make(stop)
    assert run(single, 1) == []
    windows = run(multi, 8, RowWorkers(2))
    if kernel_path == "native":
        assert max(windows) > 2 and sum(windows) >= 20  # windows did run (2 first, then up to 8)
    else:
        assert windows == []                     # the torch path has no windows
    first = base[2].output_ids.index(stop)
    assert multi[2].output_ids == base[2].output_ids[: first + 1]
    assert multi[2].finish_reason == {"type": "stop", "matched": stop}
    for a, b in zip(single, multi):
        assert b.output_ids == a.output_ids and b.finish_reason == a.finish_reason
        torch.testing.assert_close(torch.tensor(b.output_logprobs), torch.tensor(a.output_logprobs),
                                   atol=1e-5, rtol=1e-5)
    for s in multi[:2]:                          # greedy rows: transformers' argmax
        p = s.prompt_ids
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([p + s.output_ids])).logits[0, len(p) - 1:-1]
        assert s.output_ids == logits.argmax(-1).tolist()


def test_removing_a_slot_moves_only_the_last_one(models):
    _, ours = models
    runner = BatchRunner(ours)
    runner.admit([seq([7 + i, 8, 9], i, n_new=50, temperature=0) for i in range(4)])
    cache = runner.cache
    before = [t.clone() for t in cache.k]
    lens = cache.lens.clone()
    assert cache.remove(1) == 3         # slot 3 moved into the hole at 1
    assert cache.active == 3
    for old, new in zip(before, cache.k):
        assert torch.equal(new[0], old[0]) and torch.equal(new[2], old[2])
        assert torch.equal(new[1, :, : lens[3]], old[3, :, : lens[3]])
    assert cache.lens[1] == lens[3] and cache.lens[3] == 0


def _reference_draw(raw, sp, history, banned, u):
    """Float64, one row, SGLang's order: bias, penalties, bans, temperature, truncation, inverse CDF."""
    x = raw.double().clone()
    for tok, b in (sp.logit_bias or {}).items():
        x[int(tok)] += b
    counts = torch.bincount(torch.tensor(history, dtype=torch.long), minlength=x.numel()).double() \
        if history else torch.zeros_like(x)
    x -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).double()
    if sp.repetition_penalty != 1.0:
        x = torch.where((counts > 0) & (x > 0), x / sp.repetition_penalty,
                        torch.where(counts > 0, x * sp.repetition_penalty, x))
    x[banned] = -math.inf
    if sp.greedy:
        tok = int(x.argmax())
        return tok, float(torch.log_softmax(x, 0)[tok])
    p = torch.softmax(x / sp.temperature, 0)
    order = sorted(range(len(p)), key=lambda i: -float(p[i]))
    kept, mass = [], 0.0
    for rank, i in enumerate(order):
        if rank > 0 and ((sp.top_k != -1 and rank >= sp.top_k) or mass > sp.top_p
                         or float(p[i]) < sp.min_p * float(p[order[0]])):
            break
        kept.append(i)
        mass += float(p[i])
    if sp.top_k == -1 and sp.top_p >= 1.0 and sp.min_p == 0.0:
        kept = list(range(len(p)))      # untruncated rows draw in vocabulary order
    total = sum(float(p[i]) for i in kept)
    acc = 0.0
    for i in kept:
        acc += float(p[i])
        if acc > u * total:
            break
    return i, float(torch.log_softmax(x / sp.temperature, 0)[i])


def test_batched_sampling_equals_a_per_row_reference():
    g = torch.Generator().manual_seed(3)
    v = 50
    specs = [dict(temperature=0), dict(temperature=0.7), dict(temperature=1.3, top_k=5), dict(temperature=1.0, top_p=0.6),
             dict(temperature=0.8, min_p=0.2), dict(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.3),
             dict(temperature=0.9, repetition_penalty=1.4, top_k=10, top_p=0.9),
             dict(temperature=1.0, logit_bias={"7": 3.0, "9": -2.0}), dict(temperature=0, repetition_penalty=1.3)]
    params = [parse_sampling_params(s) for s in specs] * 3
    b = len(params)
    raw = torch.randn(b, v, generator=g) * 2
    history = [torch.randint(0, v, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(b)]
    banned = [[1, 2] if i % 4 == 0 else [] for i in range(b)]
    uniforms = torch.rand(b, generator=g, dtype=torch.float64).tolist()
    tokens, lps = sample_batch(raw, params, uniforms, history, banned)
    for i in range(b):
        tok, lp = _reference_draw(raw[i], params[i], history[i], banned[i], uniforms[i])
        assert tokens[i] == tok, (i, specs[i % len(specs)])
        assert math.isclose(lps[i], lp, rel_tol=1e-4, abs_tol=1e-5), (i, lps[i], lp)
        assert tokens[i] not in banned[i]
