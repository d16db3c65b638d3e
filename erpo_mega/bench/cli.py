"""`erpo-mega bench CONFIG ...`, `erpo-mega bench merge RUN ...`, `erpo-mega bench plan ...`.

Every training rank runs `bench` (as it runs `train`); rank 0 writes the outputs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="erpo-mega bench",
                                description="throughput of the real RL step (synthetic prompts, forced lengths)",
                                epilog="Also: `erpo-mega bench merge RUN_DIR ...` (scaling table) and "
                                       "`erpo-mega bench plan --model NAME --nodes N ...` (predictions).")
    p.add_argument("config", help="YAML run config (the same file `train` takes)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. bench.response_len=512 train.parallel.tp=2")
    p.add_argument("--steps", type=int, default=3, help="timed RL steps (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed RL steps first (default 1)")
    p.add_argument("--out", help="output dir (default: the config's run_dir); bench.json, bench.md, bench.png")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak TFLOP/s for MFU (default: the table for H100/H200/A100/B200/...)")
    return p


def main_bench(argv: list[str]) -> int:
    logging.basicConfig(level=os.environ.get("ERPO_LOG_LEVEL", "WARNING"))
    from erpo_mega.config import ConfigError
    from erpo_mega.run_config import load_run_config

    p = _bench_parser()
    args, unknown = p.parse_known_args(argv)
    bad = [u for u in unknown if u.startswith("-") or "=" not in u]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    overrides = list(args.overrides) + unknown
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error("--peak-tflops must be > 0")
    try:
        if args.out:
            overrides = [*overrides, f"run_dir={args.out}"]
        overrides = ["progress=false", "tensorboard=false", *overrides]
        cfg = load_run_config(args.config, overrides)
    except ConfigError as e:
        print(f"erpo-mega bench: error: {e}", file=sys.stderr, flush=True)
        return 2
    from pathlib import Path

    from erpo_mega.bench.report import console, write_all
    from erpo_mega.bench.runner import BenchTrainer, summarize
    from erpo_mega.orchestration.step_guards import RolloutProblem
    from erpo_mega.parallel.dist import destroy_distributed
    from erpo_mega.trainer import TrainingDiverged

    trainer = BenchTrainer(cfg, peak_tflops=args.peak_tflops)
    try:
        raw = trainer.bench(args.steps, args.warmup)
    except (ConfigError, FileNotFoundError, KeyError) as e:
        print(f"erpo-mega bench: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (TrainingDiverged, RolloutProblem) as e:
        print(f"erpo-mega bench: the RL step stopped: {e}", file=sys.stderr, flush=True)
        return 1
    if raw is not None:
        result = summarize(cfg, trainer.model_cfg, raw, args.steps, args.warmup)
        paths = write_all(result, Path(cfg.run_dir))
        console(result)
        print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}", flush=True)
    destroy_distributed()
    return 0


def main_merge(argv: list[str]) -> int:
    from erpo_mega.bench.merge import main

    return main(argv)


def main_plan(argv: list[str]) -> int:
    from erpo_mega.bench.plan import main

    return main(argv)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "merge":
        return main_merge(argv[1:])
    if argv and argv[0] == "plan":
        return main_plan(argv[1:])
    return main_bench(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
