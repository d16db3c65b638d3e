"""Benchmark: vocab-parallel log-prob + entropy vs. gathering the full vocabulary.

For each TP size, spawns TP ranks (one process per rank) that hold `[tokens, V/TP]` logit shards and
time forward+backward and measure peak *extra* memory of two paths in the same run:

- ours:  `erpo_mega.parallel.vocab_parallel.logprob_and_entropy` (all-reduces of per-token scalars);
- naive: megatron's `gather_from_tensor_model_parallel_region` (all-gather the vocab, autograd-aware),
  fp32 `log_softmax` + gather for the log-prob, `torch.distributions.Categorical(...).entropy()`
  (under `no_grad` when the entropy gradient is off, as a careful naive trainer would do).

Loss = sum(w1 * logp) [+ sum(w2 * entropy) with --entropy-grad]; backward w.r.t. the shard.

Peak extra memory = the high-water mark of bytes allocated *during* fwd+bwd that were still alive,
inputs excluded, the logits-shard gradient included (both paths produce it):
- CUDA: `torch.cuda.max_memory_allocated()` minus the allocation before the step;
- CPU: no allocator statistics exist, so a `TorchDispatchMode` records every tensor storage an op
  creates and drops it when the storage is freed (weakref finalizer). It sees every ATen-level
  allocation both paths make (outputs, autograd-saved tensors, gradients, collective buffers) but
  not scratch memory inside a single kernel or inside gloo; that blind spot is small and applies
  to both paths. Time and memory are measured in separate repeats (the mode slows ops down).

Time = median over repeats (paths interleaved) of fwd+bwd wall time between barriers, slowest rank.

Run (CPU, gloo):    python tools/bench_logprob_entropy.py --tokens 2048 --vocab 32768 --tp 1 2 4 [--entropy-grad]
Run (GPU, NCCL, one process per GPU):  python tools/bench_logprob_entropy.py --device cuda --tokens 8192
    --vocab 151936 --dtype bfloat16 --tp 1 2 4 8
With fewer GPUs than TP, ranks share GPU 0 through gloo on CUDA tensors (`--simulate-on-one-gpu`):
memory per rank stays exact; time then includes ranks contending for the one GPU and host
round-trips of gloo, equally for both paths.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 2**20


class LiveStorageBytes(TorchDispatchMode):
    """Tracks bytes of tensor storages created by ops inside the mode that are still alive.

    Outputs that alias an input (views, in-place ops) are not new memory and are skipped, so
    tensors that existed before the mode (the inputs) never count. `peak` is the high-water mark.
    """

    def __init__(self):
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and not t.is_meta}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                if storage.data_ptr() not in inputs:
                    self._track(storage)
        return out

    def _track(self, storage) -> None:
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self._live:
            return
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)


@dataclass(frozen=True)
class BenchConfig:
    tokens: int
    vocab: int
    dtype: str
    device: str
    temperature: float
    entropy_grad: bool
    chunk_size: int | None
    repeats: int
    simulate_on_one_gpu: bool


def _naive(shard, targets, temperature, entropy_grad):
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    full = gather_from_tensor_model_parallel_region(shard)
    x = full.float()
    if temperature != 1.0:
        x = x / temperature
    logp = torch.log_softmax(x, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    if entropy_grad:
        entropy = torch.distributions.Categorical(logits=x).entropy()
    else:
        with torch.no_grad():
            entropy = torch.distributions.Categorical(logits=x).entropy()
    return logp, entropy


def _ours(shard, targets, temperature, entropy_grad, chunk_size):
    from erpo_mega.parallel.vocab_parallel import logprob_and_entropy

    return logprob_and_entropy(shard, targets, temperature=temperature, chunk_size=chunk_size,
                               entropy_grad=entropy_grad)


def _rank_main(cfg: BenchConfig, tp: int) -> dict:
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from erpo_mega.parallel.dist import init_distributed

    cuda = cfg.device == "cuda"
    if cuda:
        local = int(os.environ["LOCAL_RANK"])
        if cfg.simulate_on_one_gpu:
            torch.cuda.set_device(0)
            dist.init_process_group("gloo")  # NCCL refuses two ranks on one GPU
        else:
            torch.cuda.set_device(local)
    init_distributed(tp=tp)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    rank, vs = ps.get_tensor_model_parallel_rank(), cfg.vocab // tp
    dtype = getattr(torch, cfg.dtype)
    g = torch.Generator().manual_seed(1234 + rank)  # each rank its own vocabulary slice
    shard_data = (torch.randn(cfg.tokens, vs, generator=g) * 3).to(device=device, dtype=dtype)
    targets = torch.randint(0, cfg.vocab, (cfg.tokens,), generator=torch.Generator().manual_seed(7)).to(device)
    w1, w2 = (torch.randn(cfg.tokens, generator=torch.Generator().manual_seed(s)).to(device) for s in (8, 9))

    paths = {
        "naive": lambda s: _naive(s, targets, cfg.temperature, cfg.entropy_grad),
        "ours": lambda s: _ours(s, targets, cfg.temperature, cfg.entropy_grad, cfg.chunk_size),
    }

    def step(fn):
        shard = shard_data.detach().requires_grad_()
        logp, entropy = fn(shard)
        loss = (logp * w1).sum()
        if cfg.entropy_grad:
            loss = loss + (entropy * w2).sum()
        loss.backward()
        return logp.detach(), entropy.detach(), shard.grad

    def sync():
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    from erpo_mega.parallel.vocab_parallel import default_chunk_size

    out = {"tp": tp, "rank": rank, "vocab_shard": vs, "chunk": cfg.chunk_size or default_chunk_size(vs)}
    values = {name: step(fn) for name, fn in paths.items()}  # warm-up, and the values compared below
    times = {name: [] for name in paths}
    for _ in range(cfg.repeats):  # interleaved, so load drifting on a shared machine hits both paths
        for name, fn in paths.items():
            sync()
            t0 = time.perf_counter()
            step(fn)
            sync()
            times[name].append(time.perf_counter() - t0)
    for name, fn in paths.items():
        out[f"{name}_s"] = statistics.median(times[name])
        sync()
        if cuda:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(fn)
            torch.cuda.synchronize()
            out[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        else:
            with LiveStorageBytes() as mode:
                result = step(fn)
            out[f"{name}_peak_bytes"] = mode.peak
            del result
        sync()
    (lp_n, h_n, g_n), (lp_o, h_o, g_o) = values["naive"], values["ours"]
    out["max_abs_diff"] = max(float((lp_n - lp_o).abs().max()), float((h_n - h_o).abs().max()),
                              float((g_n.float() - g_o.float()).abs().max()))
    from erpo_mega.parallel.dist import destroy_distributed

    destroy_distributed()
    return out


def _summarise(rank_results: list[dict]) -> dict:
    """Slowest rank's time, largest rank's memory."""
    row = {k: rank_results[0][k] for k in ("tp", "vocab_shard", "chunk")}
    for key in ("naive_s", "ours_s", "naive_peak_bytes", "ours_peak_bytes", "max_abs_diff"):
        row[key] = max(r[key] for r in rank_results)
    return row


def markdown_table(rows: list[dict], cfg: BenchConfig) -> str:
    head = ("| TP | V/TP | chunk (tokens) | naive fwd+bwd (ms) | ours (ms) | time ours/naive | naive peak extra (MiB) "
            "| ours (MiB) | mem ours/naive | mem target <= 1/TP | max abs diff |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        t_ratio = r["ours_s"] / r["naive_s"]
        m_ratio = r["ours_peak_bytes"] / r["naive_peak_bytes"]
        ok = "yes" if m_ratio <= 1 / r["tp"] else "NO"
        lines.append(f"| {r['tp']} | {r['vocab_shard']} | {r['chunk']} | {r['naive_s'] * 1e3:.0f} | {r['ours_s'] * 1e3:.0f} "
                     f"| {t_ratio:.2f} | {r['naive_peak_bytes'] / MIB:.0f} | {r['ours_peak_bytes'] / MIB:.0f} "
                     f"| {m_ratio:.3f} | {ok} | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--dtype", default=None, help="logits dtype (default float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: cuda (NCCL) when a GPU is visible, else cpu (gloo)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--entropy-grad", action="store_true", help="backpropagate through the entropy too")
    ap.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: from the budget)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--simulate-on-one-gpu", action="store_true",
                    help="CUDA with fewer GPUs than TP: all ranks on GPU 0, gloo instead of NCCL")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    for tp in args.tp:
        if args.vocab % tp:
            ap.error(f"--vocab {args.vocab} is not divisible by --tp {tp}")
        if args.device == "cuda" and not args.simulate_on_one_gpu and tp > torch.cuda.device_count():
            ap.error(f"--tp {tp} needs {tp} GPUs ({torch.cuda.device_count()} here); use --simulate-on-one-gpu")
    cfg = BenchConfig(tokens=args.tokens, vocab=args.vocab,
                      dtype=args.dtype or ("bfloat16" if args.device == "cuda" else "float32"),
                      device=args.device, temperature=args.temperature, entropy_grad=args.entropy_grad,
                      chunk_size=args.chunk_size, repeats=args.repeats, simulate_on_one_gpu=args.simulate_on_one_gpu)

    from erpo_mega.parallel.spawn import run_distributed

    rows = []
    for tp in args.tp:
        t0 = time.time()
        rows.append(_summarise(run_distributed(_rank_main, tp, cfg, tp)))
        print(f"tp={tp} done in {time.time() - t0:.0f} s", file=sys.stderr)
    print(f"config: {asdict(cfg)}, torch {torch.__version__}, {torch.get_num_threads()} threads in the parent\n")
    print(markdown_table(rows, cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
