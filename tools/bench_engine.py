"""The embedded engine over HTTP vs `transformers` `generate()`: same model, prompts, sampling, one run.

    python tools/bench_engine.py [--rows tiny,mid,group] [--threads 2] [--repeat 2]

Rows (random-init Qwen2-shaped models, 12-token prompts, temperature 0.7, no truncation,
lengths forced with ignore_eos / min_new_tokens):
  tiny   3 layers, h 128, vocab 95 (the size of examples/tiny_cpu.yaml)   128 requests x 32 tokens
  mid    6 layers, h 512, vocab 32000                                      64 requests x 64 tokens
  group  tiny shape, 16 prompts x n=8 (one GRPO step's group layout)      128 completions x 32 tokens
The engine gets one batched `/generate` with log-probs on (what the trainer asks for);
`generate()` runs in this process with the same torch thread count. Each side's best of
`--repeat` timed runs after a warm-up. Two ratios: wall clock, and CPU seconds (the server
process's user+system time from /proc, this process's for `generate()`), which a machine
loaded by other jobs disturbs far less than wall clock. The two sides alternate run by run
(the engine server idles while `generate()` runs), so drift in the machine's speed hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROWS = {
    "tiny": dict(layers=3, hidden=128, inter=384, heads=4, kv=2, vocab=95, prompts=128, n=1, new=32),
    "mid": dict(layers=6, hidden=512, inter=1408, heads=8, kv=2, vocab=32000, prompts=64, n=1, new=64),
    "group": dict(layers=3, hidden=128, inter=384, heads=4, kv=2, vocab=95, prompts=16, n=8, new=32),
}
PROMPT_LEN = 12
TEMPERATURE = 0.7


def save_model(path: Path, row: dict):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=row["vocab"], hidden_size=row["hidden"], intermediate_size=row["inter"],
                      num_hidden_layers=row["layers"], num_attention_heads=row["heads"],
                      num_key_value_heads=row["kv"], max_position_embeddings=256, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = Qwen2ForCausalLM(cfg).float().eval()
    model.save_pretrained(str(path))
    return model


def prompts_for(row: dict) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, row["vocab"], (row["prompts"], PROMPT_LEN), generator=g).tolist()


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process, all threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_runner(client, prompts: list[list[int]], row: dict, pid: int):
    """A warmed-up callable: one timed batched /generate -> (wall s, server CPU s)."""
    body = {"input_ids": prompts, "return_logprob": True,
            "sampling_params": {"max_new_tokens": row["new"], "temperature": TEMPERATURE, "ignore_eos": True,
                                "n": row["n"]}}
    client.generate_raw({**body, "input_ids": prompts[:2], "sampling_params": {**body["sampling_params"],
                                                                               "max_new_tokens": 4}})

    def once() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), process_cpu_seconds(pid)
        out = client.generate_raw(body)
        wall, cpu = time.perf_counter() - t0, process_cpu_seconds(pid) - c0
        want = len(prompts) * row["n"]
        if len(out) != want or any(len(o["output_ids"]) != row["new"] or
                                   len(o["meta_info"]["output_token_logprobs"]) != row["new"] for o in out):
            raise RuntimeError(f"engine answered {len(out)} completions, expected {want} x {row['new']} tokens")
        return wall, cpu
    return once


def generate_runner(model, prompts: list[list[int]], row: dict):
    """A warmed-up callable: one timed `generate()` -> (wall s, process CPU s)."""
    ids = torch.tensor(prompts)
    kw = dict(do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0, max_new_tokens=row["new"],
              min_new_tokens=row["new"], num_return_sequences=row["n"], pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids[:2], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4,
                                   "attention_mask": torch.ones_like(ids[:2])})

    @torch.no_grad()
    def once() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        out = model.generate(ids, **kw)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if out.shape != (len(prompts) * row["n"], PROMPT_LEN + row["new"]):
            raise RuntimeError(f"generate() returned shape {tuple(out.shape)}")
        return wall, cpu
    return once


def bench_row(name: str, row: dict, threads: int, repeat: int, workdir: Path) -> dict:
    from erpo_mega.parallel.dist import free_port
    from erpo_mega.rollout.launch import launch_embedded_server

    path = workdir / name
    model = save_model(path, row)
    prompts = prompts_for(row)
    handle = launch_embedded_server(path, port=free_port(), log_path=workdir / f"{name}.log", num_threads=threads,
                                    extra_args=["--skip-tokenizer-init", "--max-running-requests", "256"])
    try:
        # alternate the two sides, each best of `repeat`: a machine whose speed drifts during the
        # run (shared VM) then disturbs both alike instead of whichever side ran second
        engine = engine_runner(handle.client(timeout=600, max_retries=0), prompts, row, handle.process.pid)
        hf = generate_runner(model, prompts, row)
        times = [(engine(), hf()) for _ in range(repeat)]
    finally:
        handle.close()
    t_engine, c_engine = min(e[0] for e, _ in times), min(e[1] for e, _ in times)
    t_hf, c_hf = min(h[0] for _, h in times), min(h[1] for _, h in times)
    tokens = len(prompts) * row["n"] * row["new"]
    return {"row": name, "shape": f"{row['layers']}L h{row['hidden']} V{row['vocab']}",
            "requests": len(prompts) * row["n"], "new_tokens": row["new"],
            "engine_tok_s": tokens / t_engine, "generate_tok_s": tokens / t_hf, "ratio": t_hf / t_engine,
            "engine_cpu_s": c_engine, "generate_cpu_s": c_hf, "cpu_ratio": c_hf / max(c_engine, 1e-9)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="tiny,mid,group", help=f"comma list of {sorted(ROWS)}")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in names if r not in ROWS]
    if bad:
        ap.error(f"--rows: unknown row(s) {bad}; choose from {sorted(ROWS)}")
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        for name in names:
            results.append(bench_row(name, ROWS[name], args.threads, args.repeat, Path(tmp)))
            r = results[-1]
            print(f"{r['row']:6s} {r['shape']:18s} {r['requests']:4d} x {r['new_tokens']:3d}  "
                  f"engine {r['engine_tok_s']:8.0f} tok/s  generate() {r['generate_tok_s']:8.0f} tok/s  "
                  f"ratio {r['ratio']:.2f}  |  CPU s engine {r['engine_cpu_s']:.2f} generate() "
                  f"{r['generate_cpu_s']:.2f} ratio {r['cpu_ratio']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
