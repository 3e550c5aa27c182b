"""Paired statistics for claims: the difference between two groups, seed by seed, with a 95 % interval.

A claim compares side A with side B (another group, or a constant) in a stated direction. Each
seed gives one paired difference d_s = A_s - B_s (the two sides ran with the same seed, so the
same data partition, initialisation and channel draws). Over the n seeds both sides have:

    mean = (1/n) sum d_s,   sd = sqrt(sum (d_s - mean)^2 / (n - 1)),
    95 % interval = mean -+ t_{0.975, n-1} * sd / sqrt(n)       (Student's t, n - 1 degrees of freedom)

The verdict follows the interval: **holds** when it lies wholly on the claimed side of 0,
**reversed** when it lies wholly on the other side, **undecided** when it contains 0 (or when
there are fewer than 2 paired seeds: one seed gives no interval). The t interval assumes the
differences are roughly normal; with 5 seeds that is an assumption, not a check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from scipy import stats as _scipy_stats

CONFIDENCE = 0.95
DIRECTIONS = ("greater", "less")
HOLDS, REVERSED, UNDECIDED = "holds", "reversed", "undecided"


def t_quantile(confidence: float, dof: int) -> float:
    """The two-sided Student-t critical value: t such that P(|T| <= t) = confidence for T ~ t(dof)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence}")
    if dof < 1:
        raise ValueError(f"dof: must be >= 1, got {dof}")
    return float(_scipy_stats.t.ppf(0.5 + confidence / 2, dof))


@dataclass
class PairedResult:
    """The paired comparison of one claim: per-seed values, the differences and the verdict."""
    direction: str
    seeds: list[int]  # the paired seeds, sorted
    a: list[float]  # side A per paired seed
    b: list[float]  # side B per paired seed (the constant repeated for a one-sided claim)
    diffs: list[float]
    mean: float | None
    sd: float | None
    low: float | None  # 95 % interval of the mean difference (None with fewer than 2 seeds)
    high: float | None
    t: float | None  # the t quantile used
    verdict: str
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.diffs)


def verdict_of(low: float, high: float, direction: str) -> str:
    """holds / reversed / undecided for an interval [low, high] of A - B claimed `direction` of 0."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    if low > 0:
        return HOLDS if direction == "greater" else REVERSED
    if high < 0:
        return HOLDS if direction == "less" else REVERSED
    return UNDECIDED


def _t_interval(xs: list[float], mean: float, confidence: float) -> tuple[float, float, float, float]:
    """(sd, t, low, high): the Student-t interval of the mean of ``xs`` (at least 2 values)."""
    n = len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    t = t_quantile(confidence, n - 1)
    half = t * sd / math.sqrt(n)
    return sd, t, mean - half, mean + half


def paired_difference(a: dict[int, float], b: dict[int, float] | float, direction: str,
                      confidence: float = CONFIDENCE) -> PairedResult:
    """Compare A with B (values per seed, or B a constant), paired by seed, claimed A `direction` B.

    Only seeds present on both sides (with a finite value) are used; the others are named in the
    notes. Fewer than 2 paired seeds give no interval and the verdict "undecided"."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    notes: list[str] = []
    usable_a = {s: float(v) for s, v in a.items() if v is not None and math.isfinite(v)}
    if isinstance(b, dict):
        usable_b = {s: float(v) for s, v in b.items() if v is not None and math.isfinite(v)}
        seeds = sorted(set(usable_a) & set(usable_b))
        no_b, no_a = sorted(set(usable_a) - set(usable_b)), sorted(set(usable_b) - set(usable_a))
        neither = sorted((set(a) | set(b)) - set(usable_a) - set(usable_b))
        for missing, side in ((no_b, "B"), (no_a, "A"), (neither, "either side")):
            if missing:
                notes.append(f"seeds {missing}: no finite value on {side if len(side) > 1 else 'side ' + side}, "
                             "left out")
        bs = [usable_b[s] for s in seeds]
    else:
        seeds = sorted(usable_a)
        missing = sorted(set(a) - set(seeds))
        if missing:
            notes.append(f"seeds {missing} have no finite value: left out")
        bs = [float(b)] * len(seeds)
    as_ = [usable_a[s] for s in seeds]
    diffs = [x - y for x, y in zip(as_, bs)]
    n = len(diffs)
    if n == 0:
        notes.append("no paired seed: nothing to compare")
        return PairedResult(direction, seeds, as_, bs, diffs, None, None, None, None, None, UNDECIDED, notes)
    mean = sum(diffs) / n
    if n == 1:
        notes.append("one paired seed: no interval, so no verdict")
        return PairedResult(direction, seeds, as_, bs, diffs, mean, None, None, None, None, UNDECIDED, notes)
    sd, t, low, high = _t_interval(diffs, mean, confidence)
    return PairedResult(direction, seeds, as_, bs, diffs, mean, sd, low, high, t,
                        verdict_of(low, high, direction), notes)


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high): the Student-t interval of one group's mean over seeds (no interval below 2 values;
    non-finite values are left out)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None, None, None
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None, None
    _, _, low, high = _t_interval(xs, mean, confidence)
    return mean, low, high


__all__ = ["CONFIDENCE", "DIRECTIONS", "HOLDS", "REVERSED", "UNDECIDED", "PairedResult", "mean_interval",
           "paired_difference", "t_quantile", "verdict_of"]
