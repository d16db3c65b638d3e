"""`python -m erpo_mega.rollout.serve`: the embedded engine, with `sglang.launch_server`'s main flags.

The same command line (model path, host, port, tp, dtype, memory saver, seed) starts either
server, so launch scripts only swap the module name between CPU CI and GPU nodes.

`--api-key KEY` (or the environment variable ERPO_ENGINE_API_KEY, which keeps the key out of
`ps`) makes every endpoint but /health* require `Authorization: Bearer KEY`, as SGLang's
`--api-key` does. The default bind address is loopback; bind a cluster address explicitly.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading

import torch

from erpo_mega.parallel.lifeline import watch_parent
from erpo_mega.rollout.engine import Engine, EngineHTTPServer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="erpo_mega.rollout.serve",
                                description="Embedded rollout engine speaking SGLang's HTTP protocol")
    p.add_argument("--model-path", required=True, help="HuggingFace model directory (config.json + safetensors)")
    p.add_argument("--tokenizer-path", default=None, help="tokenizer dir (default: --model-path)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--tp", "--tp-size", dest="tp", type=int, default=1, help="tensor parallel size (1 only)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--enable-memory-saver", action="store_true")
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--skip-tokenizer-init", action="store_true")
    p.add_argument("--max-running-requests", type=int, default=256,
                   help="sequences decoded together (continuous batching; one request's n samples count n)")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="largest accepted request body, checked before reading it (default 64 MiB)")
    p.add_argument("--num-threads", type=int, default=None,
                   help="CPU threads (default: torch's, i.e. the cores); with the native kernels the decode "
                        "batch's rows are split over this many single-threaded workers")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: $ERPO_ENGINE_API_KEY, else no key)")
    p.add_argument("--weight-update-timeout", type=float, default=None,
                   help="seconds a begin_weight_update session may stay open before it is closed "
                        "and generation resumes (default: the engine's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    watch_parent()  # launched by a trainer: exit when it is gone, however it died
    if args.tp != 1:
        print(f"error: --tp {args.tp}: the embedded engine runs one rank; use sglang for TP > 1",
              file=sys.stderr)
        return 2
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    engine = Engine(args.model_path, dtype=args.dtype, random_seed=args.random_seed,
                    max_batch_size=args.max_running_requests, skip_tokenizer_init=args.skip_tokenizer_init,
                    enable_memory_saver=args.enable_memory_saver, tokenizer_path=args.tokenizer_path)
    api_key = args.api_key or os.environ.get("ERPO_ENGINE_API_KEY") or None
    if args.weight_update_timeout is not None:
        if args.weight_update_timeout <= 0:
            print("error: --weight-update-timeout must be > 0", file=sys.stderr)
            return 2
        engine.session_timeout_s = args.weight_update_timeout
    if args.max_running_requests < 1:
        print("error: --max-running-requests must be >= 1", file=sys.stderr)
        return 2
    limits = {"max_body_bytes": args.max_request_bytes} if args.max_request_bytes else {}
    try:
        server = EngineHTTPServer(engine, args.host, args.port, api_key=api_key, **limits)
    except OSError as e:  # PortInUseError names host:port; other bind errors keep their message
        print(f"error: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        engine.shutdown()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    logging.getLogger("erpo_mega.engine").info("listening on http://%s:%d", args.host, server.server_port)
    try:
        engine.load(start_worker=False)
    except Exception as e:
        logging.getLogger("erpo_mega.engine").error("failed to load %s: %s", args.model_path, e)
        server.shutdown()
        return 1
    threads = args.num_threads or torch.get_num_threads()   # unset: torch's default (the cores)
    if threads > 1:
        engine.use_row_threads(threads)
    # Everything loaded so far (torch, transformers, the model) lives as long as the process: keep it
    # out of the cyclic GC's full collections, which a /generate answer's many small lists trigger
    # (measured: building a 128 x 32-token answer took 9.5 ms with them, 0.6 ms without).
    gc.freeze()
    if not stop.is_set():
        engine.run_generation()  # on the main thread: torch's intra-op threads work from here
    engine.shutdown()
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
