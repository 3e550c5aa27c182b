"""Has a run's global metric flattened? A slope test over its last evaluated rounds.

The test: take the last ``window`` evaluated points (round t_i, value v_i) of the global metric
(``loss`` by default), fit v = a + b t by least squares, and divide the slope b by the window's level
mean(|v_i|). That relative slope is the fraction of its level the metric still moves per round; the
run has converged when |b| / level <= ``tolerance``. With fewer than ``window`` points there is no
verdict: the run is "not converged" (it was too short to tell), and the slope is still reported
when two or more points exist.

Example: loss 0.50, 0.40, 0.35, 0.33, 0.32 in rounds 4..8 has b = -0.043 per round and level
0.38, a relative slope of -0.11: not converged at tolerance 0.01.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    converged: bool
    final_slope: float | None  # least-squares slope / level, per round (None: < 2 points or level 0)
    points: int  # evaluated points the fit used
    window: int
    tolerance: float

    def fields(self) -> dict:
        """The metrics/summary fields: ``converged``, ``final_slope``, ``convergence`` (a sentence)."""
        return {"converged": self.converged, "final_slope": self.final_slope, "convergence": self.describe()}

    def describe(self) -> str:
        if self.converged:
            return f"converged (|slope| {abs(self.final_slope):.3g}/round <= {self.tolerance:g} over the last {self.points} evaluations)"
        if self.points < self.window:
            return f"not converged (only {self.points} evaluations; the test needs {self.window})"
        return (f"not converged (relative slope {self.final_slope:+.3g}/round over the last {self.points} "
                f"evaluations; the test needs |slope| <= {self.tolerance:g})")


def relative_slope(rounds: list[float], values: list[float]) -> float | None:
    """Least-squares slope of values over rounds, divided by mean |value|; None if undefined."""
    n = len(values)
    if n < 2 or len(rounds) != n:
        return None
    mean_t = sum(rounds) / n
    mean_v = sum(values) / n
    spread = sum((t - mean_t) ** 2 for t in rounds)
    level = sum(abs(v) for v in values) / n
    if spread == 0 or level == 0:
        return None
    slope = sum((t - mean_t) * (v - mean_v) for t, v in zip(rounds, values)) / spread
    return slope / level


def slope_test(rounds: list[float], values: list[float], window: int = 5, tolerance: float = 0.01) -> Verdict:
    """The verdict on the last ``window`` points of (rounds, values) (in round order; NaNs dropped)."""
    points = [(t, v) for t, v in zip(rounds, values) if v is not None and math.isfinite(v)]
    points = points[-window:]
    slope = relative_slope([t for t, _ in points], [v for _, v in points])
    converged = len(points) >= window and slope is not None and abs(slope) <= tolerance
    return Verdict(converged, slope, len(points), window, tolerance)


def run_verdict(rows: list[dict], metric: str = "loss", window: int = 5, tolerance: float = 0.01) -> Verdict:
    """The verdict on a run's metrics rows: the global rows (one per round, the last wins) that hold ``metric``.
    Round 0 (before training) is left out: it measures the initial model, not the training's flattening."""
    by_round = {r["round"]: r[metric] for r in rows
                if r.get("scope") == "global" and metric in r and r.get("round", 0) > 0}
    ordered = sorted(by_round)
    return slope_test(ordered, [by_round[t] for t in ordered], window, tolerance)
