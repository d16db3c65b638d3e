"""slurm/bench.sh on a real local 2-node Slurm: one bench run per sweep point through
slurm/launch.py, then the merged scaling table (1 node vs 2 nodes, one gloo rank per node)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from ..slurm.test_local_cluster_jobs import local_cluster, sbatch, wait_job
from .test_bench_cli import _cfg

REPO = Path(__file__).resolve().parents[2]

if not os.environ.get("ERPO_REQUIRE_SLURM"):
    if shutil.which("slurmctld") is None:
        pytest.skip("slurmctld not installed (CI sets ERPO_REQUIRE_SLURM=1)", allow_module_level=True)
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root", allow_module_level=True)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes():
    yield from local_cluster(2)  # its own state dir and free ports, torn down after the module


def test_sweep_on_two_nodes_produces_scaling_table(two_nodes, tmp_path):
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tmp_path / "unused")))
    out = tmp_path / "sweep"
    env = dict(two_nodes, CONFIG=str(cfg), SWEEP="1:1:1 2:1:1", STEPS="1", WARMUP="1", TASKS_PER_NODE="1",
               OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1", COLLECTIVE_SIZES_MB="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    job = sbatch(env, ["--nodes=2", f"--output={tmp_path / 'job.out'}", str(REPO / "slurm/bench.sh")])
    fields = wait_job(env, job, timeout_s=600)
    log = (tmp_path / "job.out").read_text(errors="replace")
    assert fields["JobState"] == "COMPLETED", log[-6000:]

    runs = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/bench.json")}
    assert set(runs) == {"n1-tp1-pp1-colocated", "n2-tp1-pp1-colocated"}
    one, two = runs["n1-tp1-pp1-colocated"], runs["n2-tp1-pp1-colocated"]
    assert (one["layout"]["nodes"], one["layout"]["train_devices"], one["layout"]["dp"]) == (1, 1, 1)
    assert (two["layout"]["nodes"], two["layout"]["train_devices"], two["layout"]["dp"]) == (2, 2, 2)
    assert {m["host"] for m in two["memory"]["per_rank"]} == {"n1", "n2"}  # one rank on each Slurm node

    rows = json.loads((out / "scaling" / "scaling.json").read_text())
    assert [r["nodes"] for r in rows] == [1, 2]
    base = one["step"]["tokens_per_s"]
    assert rows[1]["speedup"] == pytest.approx(two["step"]["tokens_per_s"] / base)
    assert rows[1]["efficiency"] == pytest.approx(rows[1]["speedup"] / 2)
    coll = json.loads((out / "collectives.json").read_text())  # one gloo rank on each node
    assert {r["op"] for r in coll} == {"all_reduce", "all_gather", "broadcast"}
    assert all(r["ranks"] == 2 and r["backend"] == "gloo" and r["busbw_gbps"] > 0 for r in coll)
    md = (out / "scaling" / "scaling.md").read_text()
    assert "speed-up" in md and md in log  # the merge printed the table into the job log
