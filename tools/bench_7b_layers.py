"""Memory and throughput of Qwen2.5-7B-shaped layers on one GPU, to extrapolate the 7B plan.

Builds the policy exactly as training does (PolicyWorker: megatron GPTModel, DDP,
distributed optimizer, bf16 params with fp32 main params) with Qwen2.5-7B's shapes
(hidden 3584, FFN 18944, 28 query / 4 KV heads, vocabulary 152064) but only L layers, and
runs the RL step's log-prob pass and one training step on packed batches of N tokens.
Two layer counts give the per-layer cost; the figures extrapolate to 28 layers:

    peak(28) ~= peak(L1) + (28 - L1) * (peak(L2) - peak(L1)) / (L2 - L1)

(an upper bound for activations: only one micro-batch is alive at a time). Run on a GPU:

    python tools/bench_7b_layers.py --layers 2 4 --tokens 5120 16384

CPU runs work too (tiny shapes with --small) and only check that the script runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

QWEN25_7B = dict(arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
SMALL = dict(QWEN25_7B, vocab_size=1024, hidden_size=128, intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=2)
FULL_LAYERS = 28


def _batch(tokens: int, sample_len: int, vocab: int):
    from erpo_mega.megatron.batching import PolicyBatch

    g = torch.Generator().manual_seed(0)
    n = max(1, tokens // sample_len)
    prompt = sample_len // 4
    prompts = [torch.randint(0, vocab, (prompt,), generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(0, vocab, (sample_len - prompt + 1,), generator=g).tolist() for _ in range(n)]
    return PolicyBatch(prompts, responses)


def measure(layers: int, tokens: int, sample_len: int, small: bool, recompute: str) -> dict:
    from erpo_mega.algo import LossConfig
    from erpo_mega.megatron.config import OptimConfig, ParallelConfig
    from erpo_mega.megatron.worker import PolicyWorker
    from erpo_mega.models.config import ModelConfig

    cuda = torch.cuda.is_available()
    cfg = ModelConfig.from_dict(dict(SMALL if small else QWEN25_7B, num_layers=layers))
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    worker = PolicyWorker().setup(cfg, ParallelConfig(micro_batch_tokens=tokens, pad_multiple=8 if cuda else 1,
                                                      recompute=recompute),
                                  OptimConfig(lr=1e-6), bf16=cuda)
    static = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")
    batch = _batch(tokens, sample_len, cfg.vocab_size)
    out = {"layers": layers, "tokens": batch.num_samples * sample_len, "static_gib": round(static, 2)}
    for phase in ("warmup", "timed"):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logp, _ = worker.compute_logprobs(batch)
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        batch.old_logp = logp
        batch.advantages = torch.ones_like(logp) * batch.response_mask()
        worker.train_step(batch, LossConfig())
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if phase == "timed":
            out.update(logprob_s=round(t1 - t0, 3), train_s=round(t2 - t1, 3),
                       train_tok_per_s=round(out["tokens"] / (t2 - t1)))
    out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else float("nan")
    del worker
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--tokens", type=int, nargs="+", default=[5120, 16384])
    p.add_argument("--sample-len", type=int, default=1024, help="tokens per packed sample (prompt + response)")
    p.add_argument("--recompute", default="none", choices=("none", "selective", "full"))
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--attention", default="chunked", choices=("chunked", "megatron"),
                   help="local-spec core attention: query-chunked (default) or megatron's full S x S (baseline)")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args(argv)
    from erpo_mega.parallel.dist import init_distributed

    init_distributed(1, 1)
    if a.attention == "megatron":  # every row takes DotProductAttention's own path
        from erpo_mega.models.chunked_attention import ChunkedDotProductAttention

        ChunkedDotProductAttention.chunk_tokens = 1 << 62
    print(f"attention: {a.attention}, recompute: {a.recompute}", flush=True)
    rows = []
    print(f"{'layers':>6} {'tokens':>7} {'static GiB':>10} {'peak GiB':>9} {'logprob s':>9} {'train s':>8} "
          f"{'train tok/s':>11}", flush=True)
    for tokens in a.tokens:
        for layers in a.layers:
            try:
                r = measure(layers, tokens, min(a.sample_len, tokens), a.small, a.recompute)
            except torch.OutOfMemoryError as e:  # the figure that matters: this size does not fit
                r = {"layers": layers, "tokens": tokens, "error": f"OOM: {str(e).splitlines()[0]}"}
                gc.collect()
                torch.cuda.empty_cache()
            rows.append(r)
            if "error" in r:
                print(f"{layers:>6} {tokens:>7} {r['error']}", flush=True)
            else:
                print(f"{r['layers']:>6} {r['tokens']:>7} {r['static_gib']:>10} {r['peak_gib']:>9} "
                      f"{r['logprob_s']:>9} {r['train_s']:>8} {r['train_tok_per_s']:>11}", flush=True)
        ok = [r for r in rows if r.get("tokens") == tokens and "error" not in r]
        if len(ok) >= 2 and torch.cuda.is_available():
            a1, a2 = ok[0], ok[-1]
            per_layer = (a2["peak_gib"] - a1["peak_gib"]) / (a2["layers"] - a1["layers"])
            full = a1["peak_gib"] + (FULL_LAYERS - a1["layers"]) * per_layer
            step_per_layer = (a2["train_s"] - a1["train_s"]) / (a2["layers"] - a1["layers"])
            full_s = a1["train_s"] + (FULL_LAYERS - a1["layers"]) * step_per_layer
            print(f"  -> {tokens} tokens: {per_layer:.2f} GiB/layer, 28-layer TP1 peak ~{full:.1f} GiB "
                  f"(TP2 roughly half the layer part), train step ~{full_s:.2f} s", flush=True)
            rows.append({"tokens": tokens, "extrapolated_28_layers_peak_gib": round(full, 1),
                         "gib_per_layer": round(per_layer, 3), "extrapolated_train_s": round(full_s, 2)})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
