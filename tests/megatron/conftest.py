"""Spawned runs shared by the megatron test modules (each spawn runs once per session)."""

import pytest

from erpo_mega.parallel.spawn import run_distributed
from tests.megatron.cases import single_rank_checks


@pytest.fixture(scope="session")
def single():
    """World of one: the (1,1,1) reference and its budget/packing/unpacked variants."""
    return run_distributed(single_rank_checks, 1)[0]
