"""Metrics JSONL/TensorBoard writer, resume truncation, torn lines, and the PNG plot."""

import json

import pytest

from erpo_mega.observe.metrics import MetricsWriter, PhaseTimer, read_metrics
from erpo_mega.observe.plot import plot_runs


def test_rows_keep_their_own_step_and_nonfinite_values_survive(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=True)
    w.log(3, {"loss": 0.5, "step": 1.5, "grad_norm": float("nan")})
    w.close()
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    assert row["step"] == 3 and row["metric/step"] == 1.5 and row["loss"] == 0.5
    assert row["grad_norm"] == "nan"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_resume_truncates_rows_after_the_checkpoint_and_skips_torn_lines(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for s in (1, 2, 3, 4):
        w.log(s, {"x": float(s)})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "x"')  # a process killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    w = MetricsWriter(tmp_path, tensorboard=False, resume_step=2)
    w.log(3, {"x": 30.0})
    w.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["x"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_phase_timer_tokens_per_second():
    t = PhaseTimer()
    t.seconds["train"] = 2.0
    assert t.metrics({"train": 100})["tokens_per_s/train"] == 50.0


def test_plot_writes_png_and_rejects_missing_runs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "split": "train", "reward_mean": s / 10, "entropy_mean": 1 - s / 10} for s in range(1, 6)]
    rows.append({"step": 5, "split": "eval", "accuracy": 0.4})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_runs([run])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_runs([tmp_path / "missing"])


def test_plot_has_a_panel_per_eval_set(tmp_path):
    from erpo_mega.observe.plot import eval_set_panels

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "split": "train", "reward_mean": s / 10} for s in range(1, 4)]
    rows += [{"step": s, "split": "eval", "aime24/avg@4": 0.1 * s, "aime24/pass@1": 0.1 * s, "aime24/pass@4": 0.3,
              "math500/avg@1": 0.5, "math500/pass@1": 0.5, "math500/response_len_mean": 100.0} for s in (0, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    panels = eval_set_panels([("run", rows)])
    assert [(t, [k for k, _ in series]) for t, series, _ in panels] == [
        ("eval aime24", ["aime24/avg@4", "aime24/pass@1", "aime24/pass@4"]),
        ("eval math500", ["math500/avg@1", "math500/pass@1"])]
    assert plot_runs([run]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
