"""Rank-0-only phases are waited for on the CPU wait group, not a default-group collective
(issue 13, defect 3).

The default group is given a 2 s timeout and rank 0 "works" (sleeps) for 5 s before each
hand-over: the trainer's broadcast and barrier and the checkpoint barrier must still
complete, because they wait on the wait group (its own, long timeout). A control shows the
same wait on the default group does time out, so the test can tell the two apart.
"""

from __future__ import annotations

import time

from erpo_mega.parallel.spawn import run_distributed

WORK_S = 5.0


def _ranks() -> dict:
    import torch.distributed as dist

    from erpo_mega import trainer
    from erpo_mega.megatron import checkpoint
    from erpo_mega.parallel.dist import init_distributed

    init_distributed(1, 1, timeout_s=2.0, rank0_wait_s=120.0)
    rank = dist.get_rank()
    out = {}
    for name, call in (("broadcast", lambda: trainer._broadcast({"rollout": 42} if rank == 0 else None)),
                       ("trainer_barrier", trainer._barrier), ("checkpoint_barrier", checkpoint._barrier)):
        if rank == 0:
            time.sleep(WORK_S)
        t0 = time.monotonic()
        out[name] = call()
        out[name + "_waited"] = time.monotonic() - t0
    if rank == 0:
        time.sleep(WORK_S)
    try:
        dist.barrier()  # control: the default group's 2 s timeout fires while rank 0 works
        out["control"] = "completed"
    except Exception as e:  # gloo raises RuntimeError on timeout
        out["control"] = f"timeout: {type(e).__name__}"
    return out


def test_rank0_phases_wait_on_cpu_group_with_long_timeout():
    results = run_distributed(_ranks, 2, timeout_s=180)
    other = results[1]
    assert other["broadcast"] == {"rollout": 42}
    for name in ("broadcast", "trainer_barrier", "checkpoint_barrier"):
        assert other[name + "_waited"] > WORK_S - 1.0, name  # really waited past the 2 s default timeout
    assert other["control"].startswith("timeout"), other["control"]
