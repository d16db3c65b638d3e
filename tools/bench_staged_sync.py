"""Benchmark: distributed weight sync at PP > 1, funnelled through rank 0 (baseline) vs per stage.

A TP=1 x PP=2 megatron trainer (gloo on CPU, NCCL would be used on CUDA) holds a random Qwen2
model; one embedded engine listens. Each variant exports the live weights and pushes them:

- `rank0`: `iter_hf_weights` moves every layer of stage 1 to global rank 0 (PP send/recv), which
  broadcasts the whole model over one weight-update group (the previous behaviour).
- `staged`: each stage's leader broadcasts the layers it owns over its own group
  (`StagedWeightSync`), no pipeline transfer, the stages in parallel.

The whole update is timed on rank 0 (export + pause/session + transfer + load + version/flush),
best of `--repeats`; one table with the speed-up over `rank0`.

    python tools/bench_staged_sync.py                      # ~130 MB fp32 model, 2 trainer ranks
    python tools/bench_staged_sync.py --hidden 1024 --layers 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erpo_mega.parallel.dist import free_port  # noqa: E402
from erpo_mega.parallel.spawn import run_distributed  # noqa: E402
from erpo_mega.rollout.launch import launch_embedded_server  # noqa: E402


def _rank(mcore_dir: str, url: str, repeats: int, bucket_bytes: int) -> dict | None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from erpo_mega.models.builder import build_gpt_model
    from erpo_mega.models.convert import load_weights_into, read_model_config
    from erpo_mega.orchestration.engines import StagedWeightSync
    from erpo_mega.parallel.dist import free_port, init_distributed
    from erpo_mega.rollout.client import SGLangClient
    from erpo_mega.weights.export import iter_hf_weights
    from erpo_mega.weights.transport import DistributedWeightSender

    init_distributed(tp=1, pp=2)
    cfg = read_model_config(mcore_dir)
    model = build_gpt_model(cfg).eval()
    load_weights_into([model], mcore_dir, cfg)
    rank0 = dist.get_rank() == 0
    client = SGLangClient(url, timeout=600) if rank0 else None
    sender = DistributedWeightSender([client], "127.0.0.1", free_port(), backend="gloo").connect() if rank0 else None
    staged = StagedWeightSync(ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_rank(),
                              [client] if rank0 else None, address="127.0.0.1", backend="gloo",
                              group_prefix="bench").connect()
    times: dict[str, list[float]] = {"rank0": [], "staged": []}
    nbytes = {}
    try:
        for r in range(repeats):
            for variant in ("rank0", "staged"):
                dist.barrier()
                t0 = time.perf_counter()
                if variant == "rank0":
                    named = iter_hf_weights([model], cfg)
                    if rank0:
                        rep = sender.push(named, weight_version=f"{variant}-{r}", bucket_bytes=bucket_bytes)
                        nbytes[variant] = rep.bytes
                    else:
                        for _ in named:
                            pass
                else:
                    rep = staged.sync(iter_hf_weights([model], cfg, yield_on="stage"), f"{variant}-{r}",
                                      bucket_bytes)
                    nbytes.setdefault(variant, 0)
                    if r == 0:
                        nbytes[variant] += rep.bytes
                dist.barrier()
                times[variant].append(time.perf_counter() - t0)
    finally:
        staged.close()
        if sender is not None:
            sender.close()
    return dict(times=times, bytes=nbytes) if rank0 else dict(bytes=nbytes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--bucket-mb", type=float, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from erpo_mega.models.convert import convert_hf_to_mcore

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        torch.manual_seed(0)
        hf_cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                             num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                             num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=512,
                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        Qwen2ForCausalLM(hf_cfg).float().save_pretrained(str(tmp / "hf"))
        mcore = convert_hf_to_mcore(tmp / "hf", tmp / "mcore", tp=1, pp=2, progress=False)
        engine = launch_embedded_server(tmp / "hf", port=free_port(), num_threads=1, timeout=300,
                                        log_path=tmp / "engine.log")
        try:
            out = run_distributed(_rank, 2, str(mcore), engine.url, args.repeats, int(args.bucket_mb * 2**20),
                                  timeout_s=1800)
        finally:
            engine.close()
    times = out[0]["times"]
    total = out[0]["bytes"]["rank0"]
    staged_bytes = out[0]["bytes"]["staged"] + out[1]["bytes"]["staged"]
    assert staged_bytes == total, (staged_bytes, total)
    base = min(times["rank0"])
    print(f"weight sync, TP1 x PP2 trainer (gloo) -> 1 embedded engine, {total / 2**20:.1f} MiB, "
          f"best of {args.repeats} (whole update, timed on rank 0)")
    print(f"{'variant':<8} {'seconds':>8} {'MiB/s':>8} {'vs rank0':>9}")
    for v in ("rank0", "staged"):
        best = min(times[v])
        print(f"{v:<8} {best:8.3f} {total / 2**20 / best:8.1f} {base / best:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
