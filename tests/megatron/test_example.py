"""examples/tp2_erpo_steps.py runs end to end (2 spawned gloo ranks, TP=2) and learns."""

import importlib
import math
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tp2_erpo_steps.py"


@pytest.mark.slow
def test_tp2_erpo_example_runs(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))  # spawned ranks inherit sys.path and re-import it
    module = importlib.import_module(EXAMPLE.stem)
    history = module.main(["--steps", "2"])
    assert [row["step"] for row in history] == [1, 2]
    for row in history:
        assert math.isfinite(row["loss"]) and row["grad_norm"] > 0
        # entropy of a 96-token vocabulary at temperature 1 is at most log(96)
        assert 0 < row["entropy"] <= math.log(96) + 1e-5
        assert 0 <= row["cdp_fraction"] <= 1
        assert sum(row["cdp_bucket_hist"]) == pytest.approx(1.0)
    assert history[0]["lr"] == pytest.approx(3e-3)  # warm-up of one step reaches the peak at step 1
