"""Benchmark: bucketed vs per-tensor weight sync over the distributed path.

Starts one embedded engine holding a random Qwen2-style model of a few hundred MB, joins it
to a gloo broadcast group, and pushes the full state dict three ways: one request + one
broadcast per tensor (per-tensor), and flattened buckets of two sizes. Prints one table with
bytes/s and the speed-up over per-tensor.

    python tools/bench_weight_sync.py [--hidden 768 --layers 12 --vocab 32000 --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from erpo_mega.models.config import ModelConfig
from erpo_mega.models.torch_llm import TorchLLM
from erpo_mega.parallel.dist import free_port
from erpo_mega.rollout.launch import launch_embedded_server
from erpo_mega.weights.transport import DistributedWeightSender, push_weights, save_hf_safetensors


def build_model(args, out: Path) -> list[tuple[str, torch.Tensor]]:
    cfg = ModelConfig(arch="qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = TorchLLM(cfg).to(dtype)
    named = [(n, t.detach().clone()) for n, t in model.state_dict().items()]
    save_hf_safetensors(named, out)
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return named


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--bucket-mb", type=int, nargs="+", default=[64, 512])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        named = build_model(args, tmp / "model")
        total = sum(t.numel() * t.element_size() for _, t in named)
        print(f"model: {len(named)} tensors, {total / 2**20:.1f} MiB ({args.dtype}); backend gloo (CPU engine)")
        with launch_embedded_server(tmp / "model", port=free_port(), dtype=args.dtype, num_threads=1,
                                    log_path=tmp / "engine.log", timeout=300) as handle:
            engine = handle.client(timeout=1800)
            with DistributedWeightSender([engine], "127.0.0.1", free_port(), backend="gloo") as sender:
                modes = [("per-tensor", 1, False)] + [(f"bucket {mb} MB", mb * 2**20, True) for mb in args.bucket_mb]
                rows = []
                for label, bucket_bytes, flattened in modes:
                    best = None
                    for r in range(args.repeats):
                        rep = push_weights(named, [engine], method="distributed", sender=sender,
                                           bucket_bytes=bucket_bytes, flattened=flattened,
                                           weight_version=f"{label}-{r}")
                        best = rep if best is None or rep.seconds < best.seconds else best
                    rows.append((label, best))
                check = engine.get_weights_by_name("model.norm.weight", truncate_size=8)
                ref = dict(named)["model.norm.weight"][:8].float().tolist()
                assert check == ref, "engine weights differ from the pushed ones"
    base = rows[0][1].bytes_per_s
    print(f"\n{'mode':<16}{'buckets':>8}{'MiB':>9}{'seconds':>10}{'MiB/s':>10}{'vs per-tensor':>15}")
    for label, rep in rows:
        print(f"{label:<16}{rep.buckets:>8}{rep.bytes / 2**20:>9.1f}{rep.seconds:>10.2f}"
              f"{rep.bytes_per_s / 2**20:>10.1f}{rep.bytes_per_s / base:>14.2f}x")
    print(f"(best of {args.repeats}; each push = begin/end session + HTTP request(s) + gloo broadcast(s); "
          f"{time.strftime('%Y-%m-%d %H:%M')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
