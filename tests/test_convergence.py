"""The slope test of semfl.convergence and its verdict in a run's final row, summary.json and report."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from semfl.config import ConfigError, load_config
from semfl.convergence import relative_slope, run_verdict, slope_test
from semfl.files import read_jsonl
from semfl.runtimes.run import Runner


def test_slope_test_on_the_documented_example():
    verdict = slope_test([4, 5, 6, 7, 8], [0.50, 0.40, 0.35, 0.33, 0.32], window=5, tolerance=0.01)
    # by hand: mean t = 6, mean v = 0.38, slope = (-2*.12 - 1*.02 + 0 + 1*(-.05) + 2*(-.06)) / 10 = -0.043
    assert verdict.final_slope == pytest.approx(-0.043 / 0.38, rel=1e-12)
    assert not verdict.converged and verdict.points == 5
    assert "not converged (relative slope -0.113/round" in verdict.describe()


def test_slope_matches_numpy_least_squares_on_uneven_rounds():
    rounds, values = [2, 4, 5, 9, 10], [1.3, 1.1, 1.15, 0.9, 0.95]
    slope = np.polyfit(rounds, values, 1)[0]
    assert relative_slope(rounds, values) == pytest.approx(slope / np.mean(values), rel=1e-12)


def test_flat_curves_converge_and_short_ones_have_no_verdict():
    flat = slope_test([1, 2, 3, 4, 5, 6], [9, 0.3, 0.301, 0.299, 0.3, 0.3005], window=5, tolerance=0.01)
    assert flat.converged and abs(flat.final_slope) < 0.01  # only the last 5 points count
    short = slope_test([1, 2, 3], [0.3, 0.3, 0.3], window=5)
    assert not short.converged and short.final_slope == 0.0
    assert short.describe() == "not converged (only 3 evaluations; the test needs 5)"
    assert slope_test([1], [0.3]).final_slope is None
    assert slope_test([1, 2, 3], [0.3, math.nan, 0.3], window=2).points == 2  # NaNs dropped


def test_run_verdict_reads_global_rows_after_round_zero():
    rows = [{"round": 0, "scope": "global", "loss": 100.0}, {"round": 1, "scope": "global", "loss": 2.0},
            {"round": 1, "scope": "user", "user": 0, "loss": 50.0}, {"round": 2, "scope": "global"},  # not evaluated
            {"round": 3, "scope": "global", "loss": 1.0}]
    verdict = run_verdict(rows, "loss", window=2, tolerance=1.0)
    assert verdict.final_slope == pytest.approx(-0.5 / 1.5)
    assert verdict.converged


def test_bad_convergence_settings_name_the_field():
    with pytest.raises(ConfigError, match="eval.converge_window"):
        load_config(None, ["eval.converge_window=1"])
    with pytest.raises(ConfigError, match="eval.converge_tolerance"):
        load_config(None, ["eval.converge_tolerance=0"])


def test_run_records_objective_and_convergence(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + ["method=fedavg", "rounds=3", "eval.snr_sweep=[]", "eval.grid_images=0",
                                              "eval.converge_window=3", "eval.converge_tolerance=1e-9"])
    out = Runner(cfg, tmp_path / "run", show_progress=False, log=lambda m: None).execute()
    rows = read_jsonl(out / "metrics.jsonl")
    globals_ = [r for r in rows if r["scope"] == "global"]
    assert globals_[0]["train_objective"] == "mse | sgd lr=0.05" and globals_[0]["task_objective"] == "mse"
    losses = [r["loss"] for r in globals_[1:]]
    expected = np.polyfit([1, 2, 3], losses, 1)[0] / np.mean(np.abs(losses))
    final = globals_[-1]
    assert final["round"] == 3 and final["converged"] is False
    assert final["final_slope"] == pytest.approx(expected, rel=1e-9)
    assert not any("converged" in r for r in globals_[:-1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["converged"] is False and summary["final_slope"] == final["final_slope"]
    assert summary["train_objective"] == "mse | sgd lr=0.05"
    assert '<p class="warn">not converged (relative slope' in (out / "report.html").read_text()


def test_stop_when_converged_ends_the_run_and_a_sweep_counts_it_done(tiny_overrides, tmp_path):
    from semfl.experiments.sweep import run_state

    cfg = load_config(None, tiny_overrides + ["method=fedavg", "rounds=5", "eval.snr_sweep=[]", "eval.grid_images=0",
                                              "eval.converge_window=2", "eval.converge_tolerance=100",
                                              "eval.stop_when_converged=true"])
    quiet = dict(show_progress=False, log=lambda m: None)
    out = Runner(cfg, tmp_path / "run", **quiet).execute()
    rows = read_jsonl(out / "metrics.jsonl")
    globals_ = [r for r in rows if r["scope"] == "global"]
    assert [r["round"] for r in globals_] == [0, 1, 2]  # rounds 1 and 2 are the first two points: it stops there
    assert globals_[-1]["converged"] is True and json.loads((out / "summary.json").read_text())["converged"] is True
    assert run_state(out, cfg) == "done"
    Runner(cfg, out, resume=True, **quiet).execute()  # nothing left to train
    assert read_jsonl(out / "metrics.jsonl") == rows
