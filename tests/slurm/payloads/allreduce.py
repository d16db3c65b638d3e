"""Stand-in trainer for the Slurm tests: a gloo all_reduce across the ranks srun started.

Reads rank/world torchrun-style (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) exactly
as the real trainer will, and rank 0 writes what it saw to $ERPO_RUN_DIR/metrics.jsonl so the
test can check the launcher's environment and overrides end to end. When the launcher passed a
router URL (rollout.router_url=...), rank 0 also asks it for a greedy completion of PROMPT_IDS.
"""

import json
import os
import socket
import sys
import urllib.request
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

PROMPT_IDS = [5, 6, 7, 8]


def greedy_completion(base_url: str, n_tokens: int = 4) -> list[int]:
    body = {"input_ids": PROMPT_IDS,
            "sampling_params": {"max_new_tokens": n_tokens, "temperature": 0.0, "ignore_eos": True}}
    headers = {"Content-Type": "application/json"}
    key_file = os.environ.get("ERPO_API_KEY_FILE")  # the launcher's per-job key, as the trainer reads it
    if key_file:
        headers["Authorization"] = f"Bearer {Path(key_file).read_text().strip()}"
    req = urllib.request.Request(f"{base_url}/generate", data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)["output_ids"]


def main() -> int:
    overrides = dict(arg.split("=", 1) for arg in sys.argv[1:])
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    me = torch.tensor([rank, int(os.environ["LOCAL_RANK"])], dtype=torch.int64)
    seen = [torch.zeros(2, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(seen, me)
    if rank == 0:
        record = {
            "step": 0, "allreduce_sum": value.item(), "world_size": world,
            "rank_local_rank": [t.tolist() for t in seen],
            "master_addr": os.environ["MASTER_ADDR"], "master_port": int(os.environ["MASTER_PORT"]),
            "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"), "host": socket.gethostname(),
            "overrides": overrides,
        }
        if "rollout.router_url" in overrides:
            record["prompt_ids"] = PROMPT_IDS
            record["completion_ids"] = greedy_completion(overrides["rollout.router_url"])
        out = Path(os.environ["ERPO_RUN_DIR"]) / "metrics.jsonl"
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, out)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
