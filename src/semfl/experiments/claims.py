"""Claims as data: one TOML file per paper (``configs/claims/<paper>.toml``) listing what it claims.

A claims file::

    paper = "psfl"
    [seeds]
    tuning = [0, 1]                        # seeds the defaults were chosen on: never used for verdicts
    reporting = [100, 101, 102, 103, 104]  # seeds whose runs give the reported verdicts

    [[claims]]
    id = "fig15-global-accuracy-vs-fedavg"  # unique, [A-Za-z0-9._-]
    text = "PSFL's student beats FedAvg in global accuracy"
    figure = "Figs 15-16"                   # optional: where the paper makes the claim
    sweep = "../psfl/sweep-study.toml"      # the sweep (or plain config) that makes the runs, relative to this file
    set = []                                # optional overrides of that sweep for this claim
    metric = "accuracy"                     # a metrics.jsonl field, or [metric of A, metric of B]
    scope = "global"                        # global | user_mean | link_total (or one per side)
    at = "final"                            # final | best | mean | a round number (or one per side)
    groups = ["psfl", "fedavg"]             # A, B: sweep variants (with axis parts: "psfl__alpha0.1")
    direction = "greater"                   # the claim: A greater (less) than B
    # than = 0.0                            # with one group: compare A with this constant instead
    # seeds = [...]                         # optional: this claim's reporting seeds
    differs = "cpu scale, 8 rounds, ..."    # what differs from the paper's set-up

A group names a point of the sweep by its label parts without the seed (``psfl``, ``fedcl__u5``,
``psfl__alpha0.1``): every part must be among the point's variant and axis values, and per seed
exactly one point may match. ``centralised`` and ``local`` (the bounds) are groups like any other.

Measures of one run (``scope`` / ``at``): ``global`` reads the global rows, ``user_mean`` the mean
over users per round, ``link_total`` the sum over all link rows (bits, energy: ``at`` must be
"final"). ``final`` is the last round that has the metric, ``best`` the maximum over rounds >= 1
(the minimum for losses, bits, energy, delay and time), ``mean`` the mean over rounds >= 1.
"""
from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semfl.config import ConfigError
from semfl.files import CHECKOUT

SCOPES = ("global", "user_mean", "link_total")
AT_WORDS = ("final", "best", "mean")
DIRECTIONS = ("greater", "less")
LOWER_IS_BETTER = ("loss", "bits", "energy", "delay", "wall_s", "mse")
CLAIM_KEYS = ("id", "text", "figure", "sweep", "set", "metric", "scope", "at", "groups", "than", "direction",
              "seeds", "differs")
FILE_KEYS = ("paper", "description", "seeds", "claims")
_ID = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass
class Claim:
    id: str
    text: str
    sweep: Path
    metric: tuple[str, str]  # per side (B's is unused against a constant)
    scope: tuple[str, str]
    at: tuple[str | int, str | int]
    groups: list[str]  # [A] or [A, B]
    direction: str
    than: float | None = None
    sets: list[str] = field(default_factory=list)
    seeds: list[int] | None = None  # None: the file's reporting seeds
    figure: str = ""
    differs: str = ""

    def describe(self) -> str:
        """A - B in words, e.g. ``accuracy(psfl) - accuracy(fedavg)``."""
        a = _side(self.metric[0], self.scope[0], self.at[0], self.groups[0])
        b = _side(self.metric[1], self.scope[1], self.at[1], self.groups[1]) if len(self.groups) > 1 else f"{self.than:g}"
        return f"{a} − {b}"


@dataclass
class ClaimFile:
    path: Path
    paper: str
    tuning_seeds: list[int]
    reporting_seeds: list[int]
    claims: list[Claim]
    description: str = ""

    def seeds_of(self, claim: Claim) -> list[int]:
        return list(claim.seeds) if claim.seeds is not None else list(self.reporting_seeds)


def _side(metric: str, scope: str, at, group: str) -> str:
    where = "" if scope == "global" else f"{scope} "
    when = "" if at == "final" else f" @{at}"
    return f"{where}{metric}{when}({group})"


# ------------------------------------------------------------------ reading and validation

def _seed_list(value: Any, field_name: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in value):
        raise ConfigError(f"{field_name}: expected a non-empty list of integer seeds, got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{field_name}: repeated seeds in {value!r}")
    return list(value)


def _pair(value: Any, field_name: str, allowed, kind: str) -> tuple:
    values = value if isinstance(value, list) else [value]
    if len(values) not in (1, 2):
        raise ConfigError(f"{field_name}: expected one {kind} or a list of two (A, B), got {value!r}")
    for v in values:
        if not allowed(v):
            raise ConfigError(f"{field_name}: {v!r} is not a valid {kind}")
    return (values[0], values[-1])


def _is_at(v: Any) -> bool:
    return v in AT_WORDS or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)


def parse_claim(raw: Any, where: str, base_dir: Path) -> Claim:
    """One ``[[claims]]`` table; ``where`` names it in errors (``claims[2]``)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, got {raw!r}")
    if isinstance(raw.get("id"), str):
        where = f"{where} ({raw['id']})"
    unknown = sorted(set(raw) - set(CLAIM_KEYS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (allowed: {', '.join(CLAIM_KEYS)})")
    for key in ("id", "text", "sweep", "metric", "groups", "direction"):
        if key not in raw:
            raise ConfigError(f"{where}.{key}: missing")
    for key in ("id", "text", "sweep"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise ConfigError(f"{where}.{key}: expected a non-empty string, got {raw[key]!r}")
    for key in ("figure", "differs"):
        if not isinstance(raw.get(key, ""), str):
            raise ConfigError(f"{where}.{key}: expected a string, got {raw[key]!r}")
    if not _ID.match(raw["id"]):
        raise ConfigError(f"{where}.id: only letters, digits, '.', '_' and '-' are allowed, got {raw['id']!r}")
    sweep = (base_dir / raw["sweep"]).resolve()
    if not sweep.is_file():
        raise ConfigError(f"{where}.sweep: no such file {sweep}")
    sets = raw.get("set", [])
    if not isinstance(sets, list) or not all(isinstance(s, str) and "=" in s for s in sets):
        raise ConfigError(f"{where}.set: expected a list of \"key=value\" strings, got {sets!r}")
    metric = _pair(raw["metric"], f"{where}.metric", lambda v: isinstance(v, str) and bool(v), "metric name")
    scope = _pair(raw.get("scope", "global"), f"{where}.scope", lambda v: v in SCOPES, f"scope ({', '.join(SCOPES)})")
    at = _pair(raw.get("at", "final"), f"{where}.at", _is_at, "round (final, best, mean or a round number >= 0)")
    for s, a in zip(scope, at):
        if s == "link_total" and a != "final":
            raise ConfigError(f"{where}.at: scope link_total sums every round; use at = \"final\", got {a!r}")
    groups = raw["groups"]
    if (not isinstance(groups, list) or len(groups) not in (1, 2)
            or not all(isinstance(g, str) and g for g in groups)):
        raise ConfigError(f"{where}.groups: expected [A] or [A, B] (group names), got {groups!r}")
    than = raw.get("than")
    if len(groups) == 1 and than is None:
        raise ConfigError(f"{where}.than: one group is compared with a constant; give than = <number>")
    if len(groups) == 2 and than is not None:
        raise ConfigError(f"{where}.than: give either two groups or one group and than, not both")
    if than is not None and (isinstance(than, bool) or not isinstance(than, (int, float)) or not math.isfinite(than)):
        raise ConfigError(f"{where}.than: expected a finite number, got {than!r}")
    if len(groups) == 2 and (groups[0], metric[0], scope[0], at[0]) == (groups[1], metric[1], scope[1], at[1]):
        raise ConfigError(f"{where}.groups: A and B are the same measure of the same group")
    if raw["direction"] not in DIRECTIONS:
        raise ConfigError(f"{where}.direction: expected one of {', '.join(DIRECTIONS)}, got {raw['direction']!r}")
    seeds = _seed_list(raw["seeds"], f"{where}.seeds") if "seeds" in raw else None
    return Claim(id=raw["id"], text=raw["text"], sweep=sweep, metric=metric, scope=scope, at=at, groups=list(groups),
                 direction=raw["direction"], than=None if than is None else float(than), sets=list(sets),
                 seeds=seeds, figure=raw.get("figure", ""), differs=raw.get("differs", ""))


def load_claims(path: str | Path) -> ClaimFile:
    """Read and validate a claims file; every error is a ConfigError naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"claims: no such file {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"claims: {path} is not valid TOML ({exc})") from None
    try:
        return _parse_file(raw, path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _parse_file(raw: dict, path: Path) -> ClaimFile:
    unknown = sorted(set(raw) - set(FILE_KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (allowed: {', '.join(FILE_KEYS)})")
    paper = raw.get("paper")
    if not isinstance(paper, str) or not paper:
        raise ConfigError(f"paper: expected the paper's name, got {paper!r}")
    seeds = raw.get("seeds")
    if not isinstance(seeds, dict) or set(seeds) != {"tuning", "reporting"}:
        raise ConfigError("seeds: expected a table with exactly `tuning` and `reporting` seed lists")
    tuning = _seed_list(seeds["tuning"], "seeds.tuning")
    reporting = _seed_list(seeds["reporting"], "seeds.reporting")
    if set(tuning) & set(reporting):
        raise ConfigError(f"seeds.reporting: seeds {sorted(set(tuning) & set(reporting))} are also tuning seeds; "
                          "verdicts must come from seeds nobody chose defaults on")
    items = raw.get("claims")
    if not isinstance(items, list) or not items:
        raise ConfigError("claims: expected at least one [[claims]] table")
    claims = [parse_claim(item, f"claims[{i}]", path.parent) for i, item in enumerate(items)]
    ids = [c.id for c in claims]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"claims.id: repeated ids {dupes}")
    for i, claim in enumerate(claims):
        if claim.seeds is not None and set(claim.seeds) & set(tuning):
            raise ConfigError(f"claims[{i}] ({claim.id}).seeds: seeds {sorted(set(claim.seeds) & set(tuning))} "
                              "are tuning seeds")
    return ClaimFile(path=path, paper=paper, tuning_seeds=tuning, reporting_seeds=reporting, claims=claims,
                     description=str(raw.get("description", "")))


def claims_file(paper: str, root: Path | None = None) -> Path:
    """PAPER as a path to a claims file, or the name of one in configs/claims/ (here, or in the checkout)."""
    given = Path(paper)
    if given.suffix == ".toml" or given.is_file():
        return given
    candidates = [Path("configs") / "claims" / f"{paper}.toml"]
    candidates.append(Path(root or CHECKOUT) / "configs" / "claims" / f"{paper}.toml")
    for path in candidates:
        if path.is_file():
            return path
    known = sorted(p.stem for c in candidates if c.parent.is_dir() for p in c.parent.glob("*.toml"))
    raise ConfigError(f"paper: no claims file for {paper!r} (looked for {candidates[0]}); known: {', '.join(known) or 'none'}")


# ------------------------------------------------------------------ measuring one run

def group_matches(group: str, components: list[str]) -> bool:
    """True when every ``__``-separated part of ``group`` is one of the point's label parts."""
    return set(group.split("__")) <= set(components)


def _series(run, metric: str, scope: str) -> dict[int, float]:
    per_round: dict[int, list[float]] = {}
    wanted = "global" if scope == "global" else "user"
    for row in run.rows:
        value = row.get(metric)
        if row.get("scope") == wanted and isinstance(value, (int, float)) and not isinstance(value, bool):
            if scope == "global":
                per_round[int(row["round"])] = [float(value)]  # the last global row of a round wins
            else:
                per_round.setdefault(int(row["round"]), []).append(float(value))
    return {r: sum(v) / len(v) for r, v in sorted(per_round.items())}


def measure(run, metric: str, scope: str, at) -> float | None:
    """One number of one run (a ``semfl.experiments.compare.RunData``), or None when it lacks the metric."""
    if scope == "link_total":
        return run.total(metric)
    series = _series(run, metric, scope)
    if not series:
        return None
    if at == "final":
        return series[max(series)]
    if isinstance(at, int):
        return series.get(at)
    trained = [v for r, v in series.items() if r >= 1]
    if not trained:
        return None
    if at == "mean":
        return sum(trained) / len(trained)
    lower = any(word in metric for word in LOWER_IS_BETTER)
    return min(trained) if lower else max(trained)


__all__ = ["Claim", "ClaimFile", "SCOPES", "AT_WORDS", "load_claims", "parse_claim", "claims_file",
           "group_matches", "measure"]
