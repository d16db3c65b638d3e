"""`erpo-mega` command line: train, sft, eval, convert, serve, plot, bench, prepare-data.

Each subcommand is a thin front to one room of the package; heavy imports happen inside the
subcommand so `erpo-mega --help` is instant.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_train(args, mode: str) -> int:
    from erpo_mega.trainer import run_from_cli

    return run_from_cli(args.config, args.overrides, mode=mode, resume=getattr(args, "resume", False),
                        checkpoint=getattr(args, "checkpoint", None))


def _cmd_convert(args) -> int:
    from erpo_mega.models import convert

    if args.direction == "hf-to-mcore":
        return convert.main_hf_to_mcore(args.rest) or 0
    return convert.main_mcore_to_hf(args.rest) or 0


def _cmd_serve(args) -> int:
    from erpo_mega.rollout.serve import main as serve_main

    return serve_main(args.rest) or 0


def _cmd_plot(args) -> int:
    from erpo_mega.observe.plot import plot_runs

    out = plot_runs(args.run_dirs, out=args.out)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="erpo-mega", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    for name, help_ in (("train", "full RL loop (SFT warm start if configured, then ERPO/GRPO)"),
                        ("sft", "supervised warm start only"),
                        ("eval", "evaluate a checkpoint: eval.sets (avg@k, pass@k per benchmark) or the held-out split")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="YAML config file")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 algo.erpo.beta=0.3")
        if name == "train":
            sp.add_argument("--resume", action="store_true", help="continue from the run dir's latest checkpoint")
        if name == "eval":
            sp.add_argument("--checkpoint", help="checkpoint dir (default: the run dir's latest)")
        sp.set_defaults(func=lambda a, _n=name: _cmd_train(a, _n))

    sp = sub.add_parser("convert", help="checkpoint conversion (see `erpo-mega convert DIRECTION --help`)")
    sp.add_argument("direction", choices=["hf-to-mcore", "mcore-to-hf"])
    sp.add_argument("rest", nargs=argparse.REMAINDER)
    sp.set_defaults(func=_cmd_convert)

    sp = sub.add_parser("serve", help="embedded rollout engine with SGLang's HTTP protocol and launch flags",
                        add_help=False)
    sp.add_argument("rest", nargs=argparse.REMAINDER)
    sp.set_defaults(func=_cmd_serve)

    sp = sub.add_parser("bench", help="throughput of the RL step per phase and device; `bench merge`, `bench plan`",
                        add_help=False)
    sp.add_argument("rest", nargs=argparse.REMAINDER)

    sp = sub.add_parser("prepare-data", help="public math sets (DAPO-Math-17k, MATH, GSM8K, AIME, AMC) -> "
                        "JSONL/parquet; `prepare-data --list`", add_help=False)
    sp.add_argument("rest", nargs=argparse.REMAINDER)

    sp = sub.add_parser("plot", help="PNG curves from run directories")
    sp.add_argument("run_dirs", nargs="+")
    sp.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    sp.set_defaults(func=_cmd_plot)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_known_warnings()
    # serve/convert own their flags (SGLang-compatible for serve): hand the rest over untouched,
    # which argparse.REMAINDER does not do for a leading --option.
    if argv and argv[0] == "serve":
        return int(_cmd_serve(argparse.Namespace(rest=argv[1:])) or 0)
    if argv and argv[0] == "bench":  # bench parses its own flags (and `bench merge`, `bench plan`)
        from erpo_mega.bench.cli import main as bench_main

        return int(bench_main(argv[1:]) or 0)
    if argv and argv[0] == "prepare-data":  # parses its own flags
        from erpo_mega.data.prepare import main as prepare_main

        return int(prepare_main(argv[1:]) or 0)
    if len(argv) >= 2 and argv[0] == "convert" and argv[1] in ("hf-to-mcore", "mcore-to-hf"):
        return int(_cmd_convert(argparse.Namespace(direction=argv[1], rest=argv[2:])) or 0)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # dotted overrides may come after flags: `train cfg.yaml --resume train.steps=5`
        bad = [u for u in unknown if u.startswith("-") or "=" not in u]
        if bad or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(bad or unknown)}")
        args.overrides = list(args.overrides) + unknown
    return int(args.func(args) or 0)


def quiet_known_warnings() -> None:
    """Silence import-time notices that say only that optional GPU packages are absent."""
    import warnings

    for pattern in (".*Apex is not installed.*", ".*Transformer Engine and Apex are not installed.*",
                    ".*full scope is deprecated.*", ".*Please use DTensor instead.*",
                    ".*is deprecated. Please use `torch.distributed.*", ".*`load_state_dict` is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)


if __name__ == "__main__":
    sys.exit(main())
