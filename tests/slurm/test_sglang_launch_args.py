"""Every launch command of the 7B dry run, judged by SGLang 0.5.23's and sglang-router's own parsers.

Two and four nodes, ENGINE_TP 1, 2 and 4: each engine command must parse with SGLang's
`launch_server` argument handling (tests/sglang_referee.py) into dp 1 (SGLang's weight-update
endpoints assert it), tp as asked, bound to its node's address and port, with the job's api key;
the router command must parse with sglang-router's own parser into the same worker list.
"""

from __future__ import annotations

import shlex

import pytest

from tests import sglang_referee
from tests.slurm.test_placement import dry_run, engine_cmds, model_dir  # noqa: F401  (fixture)


@pytest.mark.parametrize("nodes", ["gpu[01-02]", "gpu[01-04]"])
@pytest.mark.parametrize("engine_tp", [1, 2, 4])
@pytest.mark.parametrize("deterministic", ["0", "1"])
def test_every_engine_command_parses_with_sglangs_own_parser(model_dir, nodes, engine_tp, deterministic):  # noqa: F811
    sglang_referee.require()
    rc, f, err = dry_run("slurm/erpo_7b.sh", nodes, MODEL_DIR=model_dir, ENGINE_TP=str(engine_tp),
                         ENGINE_DETERMINISTIC=deterministic)
    assert rc == 0, err
    engine_nodes = f["engine_nodes"].split(",")
    cmds = engine_cmds(f)
    assert len(cmds) == len(engine_nodes) * 8 // engine_tp
    seen = set()
    for name, argv in cmds.items():
        args = sglang_referee.parse_server_args(argv)
        node = name.split("@")[1]
        assert (args.dp_size, args.tp_size) == (1, engine_tp), name
        assert args.host == node and args.model_path == model_dir
        assert args.api_key == "<api-key>"
        assert args.enable_deterministic_inference is (deterministic == "1")
        assert args.mem_fraction_static == 0.7  # ENGINE_ARGS reach SGLang too
        seen.add(f"http://{args.host}:{args.port}")
    assert seen == set(f["engine_urls"].split(","))  # every URL the trainer and router get is a server


@pytest.mark.parametrize("nodes", ["gpu[01-02]", "gpu[01-04]"])
def test_router_command_parses_with_sglang_routers_own_parser(model_dir, nodes):  # noqa: F811
    from sglang_router import launch_router  # a dev dependency: CI must not skip this

    rc, f, err = dry_run("slurm/erpo_7b.sh", nodes, MODEL_DIR=model_dir, ENGINE_TP="2")
    assert rc == 0, err
    argv = shlex.split(f["router_cmd"])
    args = launch_router.parse_router_args(argv[argv.index("sglang_router.launch_router") + 1:])
    assert args.worker_urls == f["engine_urls"].split(",")
    assert f["router_url"] == f"http://{args.host}:{args.port}"
    assert args.host == args.prometheus_host == f["engine_nodes"].split(",")[0]
    assert args.prometheus_port == int(f["router_metrics_port"]) != 29000
    assert args.api_key == "<api-key>" and args.policy == "cache_aware"
    assert args.health_check_timeout_secs >= 10  # SGLang's /health generates a token
