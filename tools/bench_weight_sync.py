"""Benchmark: weight sync to a rollout engine by method and bucket size, on CPU or CUDA.

Holds a random-weight model (a named shape such as qwen2.5-7b, or a small custom one) on the
trainer side, starts one engine, and pushes the full state dict with each method: per-tensor
and flattened buckets over the distributed path (one broadcast group: NCCL on CUDA, gloo on
CPU), the tensor path (CUDA IPC handles on GPU, shared memory on CPU), and optionally disk.
Prints one table with bytes/s and the speed-up over per-tensor; `--json` keeps the rows.

    python tools/bench_weight_sync.py                                  # CPU: embedded engine, gloo
    python tools/bench_weight_sync.py --device cuda --shape qwen2.5-7b --methods tensor distributed
        # CUDA: SGLang engine (--load-format dummy, so no weights on disk), NCCL broadcast

The backend follows the device (`--backend` overrides). NCCL refuses two ranks on one GPU,
so the distributed path on CUDA needs the engine on another GPU (`--engine-gpu`, default 1
when there are two or more); with one GPU use `--methods tensor` (CUDA IPC, colocated).
The embedded engine computes on CPU only, so on CUDA the engine is SGLang.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erpo_mega.models.config import ModelConfig  # noqa: E402
from erpo_mega.models.torch_llm import TorchLLM  # noqa: E402
from erpo_mega.parallel.dist import free_port  # noqa: E402
from erpo_mega.rollout.launch import launch_embedded_server, launch_sglang_server  # noqa: E402
from erpo_mega.weights.transport import DistributedWeightSender, push_weights, save_hf_safetensors  # noqa: E402


def model_cfg(args) -> ModelConfig:
    if args.shape:
        from erpo_mega.bench.shapes import model_config

        return model_config(args.shape, max_position_embeddings=4096)
    return ModelConfig(arch="qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.intermediate, num_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def random_weights(cfg: ModelConfig, dtype: torch.dtype, device: str) -> list[tuple[str, torch.Tensor]]:
    """HF-named random tensors of the shape's every parameter, built directly on `device`
    (shapes from the model on the meta device, so a 32B shape needs no host copy)."""
    with torch.device("meta"):
        shapes = [(n, t.shape) for n, t in TorchLLM(cfg).state_dict().items()]
    gen = torch.Generator(device=device).manual_seed(0)
    return [(n, (torch.randn(s, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype))
            for n, s in shapes]


def start_engine(args, cfg: ModelConfig, named, tmp: Path, dtype_name: str):
    out = tmp / "model"
    if args.engine == "embedded":
        save_hf_safetensors([(n, t.cpu()) for n, t in named], out)  # writes the dir atomically
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    port = free_port()
    if args.engine == "embedded":
        return launch_embedded_server(out, port=port, dtype=dtype_name, num_threads=1, log_path=tmp / "engine.log",
                                      timeout=600)
    env = dict(os.environ)
    if args.engine_gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(args.engine_gpu)
    return launch_sglang_server(out, port=port, dtype=dtype_name, skip_tokenizer_init=True,
                                mem_fraction_static=args.mem_fraction, log_path=tmp / "engine.log", env=env,
                                timeout=1800, extra_args=["--load-format", "dummy"])


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the trainer's weights live")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                   help="broadcast backend (auto: nccl on cuda, gloo on cpu)")
    p.add_argument("--engine", choices=["auto", "embedded", "sglang"], default="auto",
                   help="auto: SGLang on cuda, the embedded engine on cpu")
    p.add_argument("--engine-gpu", type=int, default=None,
                   help="GPU index for the SGLang engine (default: 1 when >= 2 GPUs, else 0)")
    p.add_argument("--mem-fraction", type=float, default=0.4, help="SGLang --mem-fraction-static")
    p.add_argument("--shape", default=None, help="named shape (qwen2.5-1.5b, qwen2.5-7b, qwen2.5-32b, ...)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--methods", nargs="+", default=["distributed"], choices=["distributed", "tensor", "disk"])
    p.add_argument("--bucket-mb", type=int, nargs="+", default=[64, 512])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    if args.backend == "auto":
        args.backend = "nccl" if args.device == "cuda" else "gloo"
    if args.backend == "nccl" and args.device != "cuda":
        p.error("--backend nccl needs --device cuda")
    if args.engine == "auto":
        args.engine = "sglang" if args.device == "cuda" else "embedded"
    if args.engine == "embedded" and args.backend == "nccl":
        p.error("the embedded engine computes on CPU and cannot join an NCCL group; use --engine sglang "
                "(or --backend gloo to stage through the host)")
    if args.engine == "sglang" and args.engine_gpu is None:
        args.engine_gpu = 1 if torch.cuda.device_count() >= 2 else 0
    if args.backend == "nccl" and "distributed" in args.methods and args.engine_gpu == torch.cuda.current_device():
        p.error("NCCL refuses two ranks on one GPU: the distributed path needs --engine-gpu on another GPU "
                "(this machine sees one; use --methods tensor for the colocated CUDA IPC path)")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    cfg = model_cfg(args)
    dtype = getattr(torch, args.dtype)
    named = random_weights(cfg, dtype, args.device)
    total = sum(t.numel() * t.element_size() for _, t in named)
    print(f"model: {args.shape or 'custom'} {cfg.num_parameters():,} params, {len(named)} tensors, "
          f"{total / 2**20:.1f} MiB ({args.dtype}) on {args.device}; engine {args.engine}; backend {args.backend}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with start_engine(args, cfg, named, tmp, args.dtype) as handle:
            engine = handle.client(timeout=3600)
            modes = []
            if "distributed" in args.methods:
                modes += [("distributed", "per-tensor", 1, False)]
                modes += [("distributed", f"bucket {mb} MB", mb * 2**20, True) for mb in args.bucket_mb]
            if "tensor" in args.methods:
                modes += [("tensor", f"bucket {mb} MB", mb * 2**20, True) for mb in args.bucket_mb]
            if "disk" in args.methods:
                modes += [("disk", "safetensors", max(args.bucket_mb) * 2**20, False)]
            sender = None
            try:
                if "distributed" in args.methods:
                    sender = DistributedWeightSender([engine], "127.0.0.1", free_port(), backend=args.backend)
                    sender.connect()
                for method, label, bucket_bytes, flattened in modes:
                    best = None
                    for r in range(args.repeats):
                        if args.device == "cuda":
                            torch.cuda.synchronize()
                        rep = push_weights(named, [engine], method=method, sender=sender, bucket_bytes=bucket_bytes,
                                           flattened=flattened, weight_version=f"{method}-{label}-{r}",
                                           disk_dir=tmp / "disk")
                        best = rep if best is None or rep.seconds < best.seconds else best
                    rows.append({"method": method, "mode": label, "buckets": best.buckets, "bytes": best.bytes,
                                 "seconds": best.seconds, "bytes_per_s": best.bytes_per_s})
            finally:
                if sender is not None:
                    sender.close()
            check = engine.get_weights_by_name("model.norm.weight", truncate_size=8)
            ref = dict(named)["model.norm.weight"][:8].float().cpu().tolist()
            if check is not None and [round(x, 3) for x in check] != [round(x, 3) for x in ref]:
                raise SystemExit("engine weights differ from the pushed ones")
    base = rows[0]["bytes_per_s"]
    print(f"\n{'method':<12}{'mode':<16}{'buckets':>8}{'MiB':>10}{'seconds':>10}{'MiB/s':>10}{'vs first':>10}")
    for r in rows:
        print(f"{r['method']:<12}{r['mode']:<16}{r['buckets']:>8}{r['bytes'] / 2**20:>10.1f}{r['seconds']:>10.2f}"
              f"{r['bytes_per_s'] / 2**20:>10.1f}{r['bytes_per_s'] / base:>9.2f}x")
    print(f"(best of {args.repeats}; each push = the whole update: pause, begin/end session, HTTP request(s), "
          f"transfer, load, resume; {time.strftime('%Y-%m-%d %H:%M')})")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "backend": args.backend, "engine": args.engine,
                                               "shape": args.shape, "params": cfg.num_parameters(), "rows": rows},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
