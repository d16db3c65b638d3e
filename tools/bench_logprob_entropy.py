"""Benchmark: vocab-parallel log-prob + entropy vs. slime's fused function, the naive gather, and memory bandwidth.

For each TP size, spawns TP ranks (one process per rank) that hold `[tokens, V/TP]` logit shards and,
in the same run and on the same shards, time forward+backward and measure peak *extra* memory of:

- ours:  `erpo_mega.parallel.vocab_parallel.logprob_and_entropy` (all-reduces of per-token scalars);
- slime: slime's `calculate_log_probs_and_entropy` (slime/utils/ppo_utils.py), loaded at run time
  from a checkout given with `--slime-dir` (never vendored here), with its defaults (no chunking),
  `with_entropy=True` and `with_entropy_grad` as benchmarked;
- naive: megatron's `gather_from_tensor_model_parallel_region` (all-gather the vocab, autograd-aware),
  fp32 `log_softmax` + gather for the log-prob, `torch.distributions.Categorical(...).entropy()`
  (under `no_grad` when the entropy gradient is off, as a careful naive trainer would do);
- copy:  `dst.copy_(src)` of a buffer the size of the shard: the machine's memory bandwidth
  (read + write bytes / time), timed in the same interleaved loop, so under the same load.

Loss = sum(w1 * logp) [+ sum(w2 * entropy) with the entropy gradient on]; backward w.r.t. the shard.

Ours runs three ways: "ours" (native kernels on fp32 CPU, gradient into a fresh buffer), "ours
in-place" (`inplace_grad=True`: the gradient overwrites the input, which is refilled from the same
data before each run, untimed) and "ours torch path" (`ERPO_NATIVE=0`). Before every timed run a
64 MiB buffer is read so that no path starts with the shard in cache.

Bandwidth: ours must sweep the shard a fixed number of times (`ours_passes`): native kernels read
the logits in forward and again in backward and write the gradient (3); the torch path does the
same when recomputing, or, when the fp32 softmax is kept within the byte budget, reads the logits
and writes the softmax in forward and reads/writes it in backward (4; 5 with the entropy gradient,
which reads the logits once more). Bytes = passes x tokens x V/TP x
element size; GB/s = bytes / (fwd+bwd time); "% of copy" compares it with the copy's GB/s.

Peak extra memory = the high-water mark of bytes allocated *during* fwd+bwd that were still alive,
inputs excluded, the logits-shard gradient included (every path produces it):
- CUDA: `torch.cuda.max_memory_allocated()` minus the allocation before the step;
- CPU: no allocator statistics exist, so a `TorchDispatchMode` records every tensor storage an op
  creates and drops it when the storage is freed (weakref finalizer). It sees every ATen-level
  allocation the paths make (outputs, autograd-saved tensors, gradients, collective buffers) but
  not scratch memory inside a single kernel or inside gloo; that blind spot is small and applies
  to every path. Time and memory are measured in separate repeats (the mode slows ops down).

Time = median over repeats (paths interleaved) of fwd+bwd wall time between barriers, slowest rank.
Other processes on the machine slow every path in a repeat alike; compare within one run. On a
loaded CPU a 20 ms copy often runs inside one time slice while a 200 ms step is preempted, so the
table also gives "% of copy, CPU time": the same ratio from the process CPU time of each (time
actually spent running; with one thread per rank this excludes waiting for the core).

Run (CPU, gloo; slime from a checkout, e.g. `git --git-dir=<mirror> archive HEAD slime | tar -x -C /tmp/slime`):
    python tools/bench_logprob_entropy.py --tokens 2048 --vocab 32768 --tp 1 2 --entropy-grad both \\
        --slime-dir /tmp/slime
Run (GPU, NCCL, one process per GPU):  python tools/bench_logprob_entropy.py --device cuda --tokens 8192
    --vocab 152064 --dtype bfloat16 --tp 1 2 4 --entropy-grad both [--slime-dir ...]
With fewer GPUs than TP, ranks share GPU 0 through gloo on CUDA tensors (`--simulate-on-one-gpu`):
memory per rank stays exact; time then includes ranks contending for the one GPU and host
round-trips of gloo, equally for every path.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
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
    entropy_grads: tuple[bool, ...]
    chunk_size: int | None
    save_bytes: int | None
    repeats: int
    simulate_on_one_gpu: bool
    slime_dir: str | None
    naive: bool
    before_file: str | None = None
    torch_path: bool = True


def load_slime(slime_dir: str):
    """slime's `calculate_log_probs_and_entropy`, imported from its file (no slime package install)."""
    path = Path(slime_dir) / "slime" / "utils" / "ppo_utils.py"
    if not path.is_file():
        raise FileNotFoundError(f"--slime-dir: {path} not found (expected a checkout of github.com/THUDM/slime)")
    spec = importlib.util.spec_from_file_location("slime_ppo_utils_for_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.calculate_log_probs_and_entropy


def load_before(path: str):
    """`logprob_and_entropy` of another version of vocab_parallel.py (e.g. `git show HEAD~1:...`)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--before-file: {path} not found")
    spec = importlib.util.spec_from_file_location("vocab_parallel_before_for_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.logprob_and_entropy


def ours_passes(cfg: BenchConfig, vocab_shard: int, entropy_grad: bool, native: bool, inplace: bool) -> int:
    """Sweeps over the shard ours must make through memory (module doc of `vocab_parallel`).

    Native kernels (fp32 CPU): forward reads x (1), backward reads x and writes the gradient (2) = 3,
    in place or into a fresh buffer alike. Torch path: 3 when recomputing; with the softmax kept,
    read x + write p, read p + write the gradient (4), 5 when the entropy gradient reads x again.
    """
    from erpo_mega.parallel.vocab_parallel import DEFAULT_SAVE_BYTES

    if native:
        return 3
    budget = DEFAULT_SAVE_BYTES if cfg.save_bytes is None else cfg.save_bytes
    kept = not inplace and cfg.dtype == "float32" and cfg.tokens * vocab_shard * 4 <= budget
    return (5 if entropy_grad else 4) if kept else 3


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


def _rank_main(cfg: BenchConfig, tp: int) -> list[dict]:
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from erpo_mega.parallel.dist import destroy_distributed, init_distributed
    from erpo_mega.parallel.vocab_parallel import default_chunk_size, logprob_and_entropy

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
    group = ps.get_tensor_model_parallel_group()
    dtype = getattr(torch, cfg.dtype)
    g = torch.Generator().manual_seed(1234 + rank)  # each rank its own vocabulary slice
    shard_data = (torch.randn(cfg.tokens, vs, generator=g) * 3).to(device=device, dtype=dtype)
    targets = torch.randint(0, cfg.vocab, (cfg.tokens,), generator=torch.Generator().manual_seed(7)).to(device)
    w1, w2 = (torch.randn(cfg.tokens, generator=torch.Generator().manual_seed(s)).to(device) for s in (8, 9))
    copy_dst = torch.empty_like(shard_data)
    slime_fn = load_slime(cfg.slime_dir) if cfg.slime_dir else None
    before_fn = load_before(cfg.before_file) if cfg.before_file else None

    def sync():
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    from erpo_mega.native import native_status
    from erpo_mega.parallel.vocab_parallel import _native_for

    native = _native_for(shard_data.reshape(-1, vs)) is not None
    inplace_buf = torch.empty_like(shard_data)  # in-place paths consume their input: refilled untimed
    inplace_buf.copy_(shard_data)
    flush = torch.ones(max(1, 64 * MIB // 4), device=device)  # read between runs: no path starts cache-warm

    def ours(eg, inplace=False, torch_path=False):
        def run(s):
            mode = os.environ.get("ERPO_NATIVE")
            if torch_path:
                os.environ["ERPO_NATIVE"] = "0"
            try:
                return logprob_and_entropy(s, targets, temperature=cfg.temperature, chunk_size=cfg.chunk_size,
                                           entropy_grad=eg, save_bytes=cfg.save_bytes, inplace_grad=inplace)
            finally:
                if torch_path and mode is None:
                    os.environ.pop("ERPO_NATIVE")
                elif torch_path:
                    os.environ["ERPO_NATIVE"] = mode
        return run

    results = []
    for entropy_grad in cfg.entropy_grads:
        # name -> (function of the shard, consumes its input)
        paths = {"ours": (ours(entropy_grad), False), "ours in-place": (ours(entropy_grad, inplace=True), True)}
        if native and cfg.torch_path:
            paths["ours torch path"] = (ours(entropy_grad, torch_path=True), False)
        if slime_fn is not None:
            if cfg.temperature != 1.0:
                raise ValueError("--slime-dir: slime's function takes no temperature; use --temperature 1")

            def slime_path(s, eg=entropy_grad):
                logp, entropy = slime_fn(s, targets, group, with_entropy=True, with_entropy_grad=eg)
                return logp.view(targets.shape), entropy  # slime returns the log-prob as [tokens, 1]

            paths["slime"] = (slime_path, False)
        if before_fn is not None:
            paths["before"] = (lambda s, eg=entropy_grad: before_fn(s, targets, temperature=cfg.temperature,
                                                                    entropy_grad=eg), False)
        if cfg.naive:
            paths["naive"] = (lambda s, eg=entropy_grad: _naive(s, targets, cfg.temperature, eg), False)

        def prepare(consumes):  # untimed: refill a consumed input, then evict the caches
            if consumes:
                inplace_buf.copy_(shard_data)
            flush.sum()

        def step(fn, consumes, eg=entropy_grad):
            shard = (inplace_buf if consumes else shard_data).detach().requires_grad_()
            logp, entropy = fn(shard)
            loss = (logp * w1).sum()
            if eg:
                loss = loss + (entropy * w2).sum()
            (grad,) = torch.autograd.grad(loss, shard)  # no .grad accumulation (which may copy)
            return logp.detach(), entropy.detach(), grad

        out = {"tp": tp, "rank": rank, "vocab_shard": vs, "entropy_grad": entropy_grad, "cuda": cuda,
               "chunk": cfg.chunk_size or default_chunk_size(vs, device=device), "native": native,
               "native_status": native_status("logprob_entropy"),
               "passes": {name: ours_passes(cfg, vs, entropy_grad, native and name != "ours torch path",
                                            name == "ours in-place")
                          for name in paths if name.startswith("ours")},
               "shard_bytes": shard_data.numel() * shard_data.element_size()}
        values = {}
        for name, (fn, consumes) in paths.items():  # warm-up, and the values compared below
            prepare(consumes)
            lp, h, gr = step(fn, consumes)
            values[name] = (lp, h, gr.clone() if consumes else gr)
        timed = {**{name: (lambda fn=fn, c=consumes: step(fn, c), consumes) for name, (fn, consumes) in paths.items()},
                 "copy": (lambda: copy_dst.copy_(shard_data), False)}
        timed["copy"][0]()
        times = {name: [] for name in timed}
        cpu_times = {name: [] for name in timed}
        for _ in range(cfg.repeats):  # interleaved, so load drifting on a shared machine hits every path
            for name, (fn, consumes) in timed.items():
                prepare(consumes)
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                c1 = time.process_time()
                sync()
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(c1 - c0)
        for name in timed:
            out[f"{name}_s"] = statistics.median(times[name])
            out[f"{name}_cpu_s"] = statistics.median(cpu_times[name])
        for name, (fn, consumes) in paths.items():
            prepare(consumes)
            sync()
            if cuda:
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step(fn, consumes)
                torch.cuda.synchronize()
                out[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated() - base
            else:
                with LiveStorageBytes() as mode:
                    result = step(fn, consumes)
                out[f"{name}_peak_bytes"] = mode.peak
                del result
            sync()
        lp_o, h_o, g_o = values["ours"]
        for name in paths:
            if name != "ours":
                lp, h, gr = values[name]
                out[f"{name}_max_abs_diff"] = max(float((lp - lp_o).abs().max()), float((h - h_o).abs().max()),
                                                  float((gr.float() - g_o.float()).abs().max()))
        out["paths"] = list(paths)
        results.append(out)
    destroy_distributed()
    return results


def _summarise(rank_results: list[dict]) -> dict:
    """Slowest rank's time, largest rank's memory and difference."""
    row = {k: rank_results[0][k] for k in ("tp", "vocab_shard", "entropy_grad", "chunk", "passes", "shard_bytes",
                                           "cuda", "native", "native_status", "paths")}
    for key in rank_results[0]:
        if key.endswith(("_s", "_peak_bytes", "_max_abs_diff")):  # also *_cpu_s
            row[key] = max(r[key] for r in rank_results)
    return row


def markdown_table(rows: list[dict]) -> str:
    """One line per (TP, entropy gradient, path); the copy line gives the bandwidth the others are compared with."""
    head = ["TP", "entropy grad", "path", "passes", "ms", "GB/s", "% of copy", "% of copy, CPU time",
            "time / slime", "peak extra MiB", "mem / slime", "max abs diff vs ours"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        copy_gbs = 2 * r["shard_bytes"] / r["copy_s"] / 1e9
        slime = "slime_s" in r
        for name in [*r["paths"], "copy"]:
            passes = 2 if name == "copy" else r["passes"].get(name)
            t, cpu = r[f"{name}_s"], r[f"{name}_cpu_s"]
            cells = [r["tp"], "on" if r["entropy_grad"] else "off", name, passes if passes else "",
                     f"{t * 1e3:.0f}"]
            if passes:
                gbs = passes * r["shard_bytes"] / t / 1e9
                cpu_pct = "n/a" if r["cuda"] else f"{100 * passes * r['copy_cpu_s'] / (2 * cpu):.0f}%"
                cells += [f"{gbs:.1f}", f"{100 * gbs / copy_gbs:.0f}%", cpu_pct]
            else:
                cells += ["", "", ""]
            cells.append(f"{t / r['slime_s']:.2f}" if slime and name != "copy" else "")
            peak = r.get(f"{name}_peak_bytes")
            cells.append("" if peak is None else f"{peak / MIB:.0f}")
            cells.append(f"{peak / r['slime_peak_bytes']:.2f}" if slime and peak is not None else "")
            diff = r.get(f"{name}_max_abs_diff")
            cells.append("" if diff is None else f"{diff:.1e}")
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtype", default=None, help="logits dtype (default float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--entropy-grad", nargs="?", const="on", default="off", choices=["off", "on", "both"],
                    help="backpropagate through the entropy too (bare flag = on; both = one row each)")
    ap.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: from the device)")
    ap.add_argument("--save-bytes", type=int, default=None,
                    help="byte budget for keeping the softmax between forward and backward (default: the module's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slime-dir", default=None, help="checkout of THUDM/slime to compare with (optional)")
    ap.add_argument("--before-file", default=None,
                    help="another vocab_parallel.py to time as 'before' (e.g. the previous commit's)")
    ap.add_argument("--no-naive", action="store_true", help="skip the all-gather path (slow at TP 1)")
    ap.add_argument("--no-torch-path", action="store_true",
                    help="skip 'ours torch path' (ours with ERPO_NATIVE=0, timed when the native kernels run)")
    ap.add_argument("--thp", action="store_true",
                    help="set THP_MEM_ALLOC_ENABLE=1 for the ranks: PyTorch then backs large CPU tensors with "
                         "2 MiB pages, so first touching a fresh [tokens, V/TP] buffer costs far fewer page "
                         "faults (every path allocates at least the gradient)")
    ap.add_argument("--simulate-on-one-gpu", action="store_true",
                    help="CUDA with fewer GPUs than TP: all ranks on GPU 0, gloo instead of NCCL")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    for tp in args.tp:
        if args.vocab % tp:
            ap.error(f"--vocab {args.vocab} is not divisible by --tp {tp}")
        if args.device == "cuda" and not args.simulate_on_one_gpu and tp > torch.cuda.device_count():
            ap.error(f"--tp {tp} needs {tp} GPUs ({torch.cuda.device_count()} here); use --simulate-on-one-gpu")
    if args.slime_dir:
        try:
            load_slime(args.slime_dir)
        except (FileNotFoundError, ImportError, SyntaxError) as e:
            ap.error(str(e))
        if args.temperature != 1.0:
            ap.error("--temperature: slime's function takes none; compare with --slime-dir at 1.0 only")
    grads = {"off": (False,), "on": (True,), "both": (False, True)}[args.entropy_grad]
    cfg = BenchConfig(tokens=args.tokens, vocab=args.vocab,
                      dtype=args.dtype or ("bfloat16" if args.device == "cuda" else "float32"),
                      device=args.device, temperature=args.temperature, entropy_grads=grads,
                      chunk_size=args.chunk_size, save_bytes=args.save_bytes, repeats=args.repeats,
                      simulate_on_one_gpu=args.simulate_on_one_gpu, slime_dir=args.slime_dir, naive=not args.no_naive,
                      before_file=args.before_file, torch_path=not args.no_torch_path)

    from erpo_mega.parallel.spawn import run_distributed

    if args.thp:  # read once per process by PyTorch's CPU allocator: set before the ranks start
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    rows = []
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for tp in args.tp:
        t0 = time.time()
        per_rank = run_distributed(_rank_main, tp, cfg, tp)
        rows.extend(_summarise([r[i] for r in per_rank]) for i in range(len(grads)))
        print(f"tp={tp} done in {time.time() - t0:.0f} s", file=sys.stderr)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"config: {asdict(cfg)}, native kernels: {rows[0]['native_status']}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"1-min load average {load_before:.1f} before / {load_after:.1f} after\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
