"""run_distributed: results in rank order, failures reported with the rank's traceback, no hangs."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from erpo_mega.parallel.spawn import run_distributed


def _rank_and_world() -> tuple[int, int]:
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _rank1_fails_rank0_waits() -> None:
    """Rank 1 raises; rank 0 blocks in a barrier that can never complete."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    if dist.get_rank() == 1:
        raise ValueError("bad shard 7")
    dist.barrier()


def _leaves_child_holding_fds(marker_dir: str) -> int:
    """Start a grandchild that inherits every fd and outlives this rank (as torch_shm_manager does)."""
    rank, _ = _rank_and_world()
    keep = subprocess.Popen(["sleep", "60"], close_fds=False, start_new_session=True)
    with open(os.path.join(marker_dir, f"child{rank}"), "w") as f:
        f.write(str(keep.pid))
    return rank * 10


def test_results_come_back_in_rank_order():
    assert run_distributed(_rank_and_world, 3, timeout_s=120) == [(0, 3), (1, 3), (2, 3)]


def test_a_failing_rank_is_reported_and_the_blocked_one_killed():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        run_distributed(_rank1_fails_rank0_waits, 2, timeout_s=300)
    message = str(info.value)
    assert "rank 1: ValueError: bad shard 7" in message
    assert "Traceback" in message
    assert time.monotonic() - t0 < 120  # well before both the 300 s deadline and gloo's 600 s timeout


def test_ranks_that_leave_fd_holding_children_still_finish(tmp_path):
    # A grandchild holding the rank's inherited pipe ends kept torch's sentinel-based join
    # waiting until the grandchild died; exit codes are what decide.
    t0 = time.monotonic()
    try:
        assert run_distributed(_leaves_child_holding_fds, 2, str(tmp_path), timeout_s=50) == [0, 10]
        assert time.monotonic() - t0 < 45
    finally:
        for marker in tmp_path.glob("child*"):
            try:
                os.kill(int(marker.read_text()), 9)
            except ProcessLookupError:
                pass
