"""Collective bus bandwidth between ranks (nodes), with nccl-tests' definitions.

    algbw = bytes / seconds                 (bytes = the size of one rank's buffer)
    busbw = algbw x factor                   all_reduce 2(n-1)/n, all_gather and reduce_scatter
                                             (n-1)/n (not on gloo, which lacks it), broadcast 1

busbw is what one link must carry, so it is comparable across rank counts and with the
hardware's link speed. NCCL on CUDA, gloo on CPU (the backend follows the device). Each size
is timed as the median of `iters` calls after `warmup`, with a barrier (and a CUDA sync)
around each, and the result of the all-reduce is checked.

    srun --ntasks-per-node=1 python -m erpo_mega.bench.collectives --sizes-mb 1 16 256  # across nodes
    python -m erpo_mega.bench.collectives --nprocs 2                                   # local ranks
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")


def bus_factor(op: str, n: int) -> float:
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter"):
        return (n - 1) / n
    if op == "broadcast":
        return 1.0
    raise ValueError(f"unknown collective {op!r}; one of {OPS}")


def _measure(sizes_mb: list[float], ops: list[str], iters: int, warmup: int) -> list[dict]:
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    n, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for mb in sizes_mb:
        numel = max(n, int(mb * 2**20 / 4) // n * n)  # fp32, divisible by n for reduce_scatter
        x = torch.full((numel,), float(rank + 1), device=dev)
        out_list = [torch.empty(numel // n, device=dev) for _ in range(n)]
        for op in ops:
            if op == "reduce_scatter" and dist.get_backend() == "gloo":
                continue  # gloo has no reduce_scatter
            times = []
            for i in range(warmup + iters):
                buf = x.clone()
                if cuda:
                    torch.cuda.synchronize()
                dist.barrier()
                t0 = time.perf_counter()
                if op == "all_reduce":
                    dist.all_reduce(buf)
                elif op == "all_gather":
                    dist.all_gather(out_list, buf[: numel // n])
                elif op == "reduce_scatter":
                    dist.reduce_scatter(out_list[0], list(buf.chunk(n)))
                else:
                    dist.broadcast(buf, src=0)
                if cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
                if op == "all_reduce" and i == 0:
                    expect = n * (n + 1) / 2
                    if float(buf[0]) != expect or float(buf[-1]) != expect:
                        raise RuntimeError(f"all_reduce gave {float(buf[0])}, expected {expect}")
            t = torch.tensor([statistics.median(times)], device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's median
            sec = float(t)
            nbytes = numel * 4 if op in ("all_reduce", "broadcast", "reduce_scatter") else numel // n * 4 * n
            algbw = nbytes / sec
            rows.append({"op": op, "bytes": nbytes, "seconds": sec, "algbw_gbps": algbw / 1e9,
                         "busbw_gbps": algbw * bus_factor(op, n) / 1e9, "ranks": n,
                         "backend": dist.get_backend()})
    return rows


def _rank_main(sizes_mb, ops, iters, warmup):
    import datetime

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(seconds=600))
    try:
        return _measure(sizes_mb, ops, iters, warmup)
    finally:
        dist.destroy_process_group()


def render(rows: list[dict]) -> str:
    lines = ["| op | ranks | backend | MiB | seconds | algbw GB/s | busbw GB/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['ranks']} | {r['backend']} | {r['bytes'] / 2**20:.1f} | {r['seconds']:.5f} | "
                     f"{r['algbw_gbps']:.3f} | {r['busbw_gbps']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m erpo_mega.bench.collectives", description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 16, 128])
    p.add_argument("--ops", nargs="+", choices=OPS, default=["all_reduce", "all_gather", "broadcast"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--nprocs", type=int, default=None,
                   help="spawn this many local ranks (default: join the torchrun/srun world from env)")
    p.add_argument("--json", help="write the rows here (rank 0)")
    args = p.parse_args(argv)
    if min(args.sizes_mb) <= 0 or args.iters < 1 or args.warmup < 0:
        p.error("--sizes-mb must be > 0, --iters >= 1, --warmup >= 0")
    if args.nprocs:
        from erpo_mega.parallel.spawn import run_distributed

        rows = run_distributed(_rank_main, args.nprocs, args.sizes_mb, args.ops, args.iters, args.warmup)[0]
        rank = 0
    else:
        if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:  # under srun without the rank shim
            os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                              LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in os.environ or "WORLD_SIZE" not in os.environ:
            p.error("no distributed world in the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): "
                    "run under torchrun/srun, or pass --nprocs N for local ranks")
        rank = int(os.environ["RANK"])
        rows = _rank_main(args.sizes_mb, args.ops, args.iters, args.warmup)
    if rank == 0:
        print(render(rows), end="")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
