"""Benchmark: GRPO rollout through sglang-router, `round_robin` (baseline) vs `cache_aware`.

A GRPO step samples G responses per prompt, each its own request (own seed). `round_robin`
spreads a group over every worker, so each worker prefills the same prompt again;
`cache_aware` sends the group to one worker, which prefills it once (SGLang's radix cache;
the embedded engine prefills identical prompts admitted together once). Same engines, same
requests, both policies in one run; prints rollout tokens/s (prompt + completion tokens per
second of wall time) and the speed-up over round_robin.

    python tools/bench_rollout_routing.py                       # 2 embedded engines on CPU
    python tools/bench_rollout_routing.py --prompt-len 512 --groups 8 --group-size 8 --repeats 3

Long prompts and short completions (as in reasoning RL with a long few-shot or system
prompt) are where the prefix matters most; the figure depends on that ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erpo_mega.parallel.dist import free_port  # noqa: E402
from erpo_mega.rollout.launch import launch_embedded_server, launch_router  # noqa: E402


def save_model(path: Path, args) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                      num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    Qwen2ForCausalLM(cfg).float().save_pretrained(str(path))


def run_policy(policy: str, urls: list[str], args, tmp: Path, prompts: list[list[int]]) -> dict:
    router = launch_router(urls, free_port(), policy=policy, log_path=tmp / f"router_{policy}.log",
                           extra_args=["--log-level", "warn", "--shutdown-grace-period-secs", "1"])
    try:
        client = router.client(timeout=600, max_concurrency=args.concurrency)
        bodies = [{"input_ids": p, "sampling_params": {"max_new_tokens": args.new_tokens, "ignore_eos": True,
                                                        "temperature": 1.0, "sampling_seed": 1000 * g + j}}
                  for g, p in enumerate(prompts) for j in range(args.group_size)]
        client.generate_raw(bodies[0])  # warm-up (and the router's first connection)
        best = None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                outs = list(pool.map(client.generate_raw, bodies))
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        completion = sum(len(o["output_ids"]) for o in outs)
        prompt_tokens = sum(len(b["input_ids"]) for b in bodies)
        return dict(policy=policy, seconds=best, samples=len(bodies), prompt_tokens=prompt_tokens,
                    completion_tokens=completion, tokens_per_s=(prompt_tokens + completion) / best,
                    samples_per_s=len(bodies) / best)
    finally:
        router.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--groups", type=int, default=4, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=8, help="samples per prompt (G)")
    ap.add_argument("--prompt-len", type=int, default=384)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per policy (best is reported)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        save_model(tmp / "model", args)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, args.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.groups)]
        handles = [launch_embedded_server(tmp / "model", port=free_port(), num_threads=args.threads, wait=False,
                                          log_path=tmp / f"engine{i}.log", extra_args=["--max-running-requests",
                                                                                       str(args.concurrency)])
                   for i in range(args.engines)]
        try:
            for h in handles:
                h.wait_healthy(300)
            urls = [h.url for h in handles]
            rows = [run_policy(p, urls, args, tmp, prompts) for p in ("round_robin", "cache_aware")]
        finally:
            for h in handles:
                h.close()
    base = rows[0]["tokens_per_s"]
    print(f"rollout: {args.engines} engines, {args.groups} groups x G={args.group_size}, "
          f"prompt {args.prompt_len} + {args.new_tokens} new tokens, best of {args.repeats}")
    print(f"{'policy':<12} {'seconds':>8} {'tokens/s':>10} {'samples/s':>10} {'vs round_robin':>15}")
    for r in rows:
        print(f"{r['policy']:<12} {r['seconds']:8.2f} {r['tokens_per_s']:10.0f} {r['samples_per_s']:10.2f} "
              f"{r['tokens_per_s'] / base:14.2f}x")
    if args.json:
        args.json.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
