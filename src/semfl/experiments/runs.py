"""Finished run directories as data: their config, metrics rows and summary, grouped by name without the seed."""
from __future__ import annotations

import re
import tomllib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from semfl.files import read_jsonl


@dataclass
class RunData:
    path: Path
    config: dict
    rows: list[dict]
    name: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.name = self.name or self.path.name

    @property
    def method(self) -> str:
        return str(self.config.get("method") or next((r.get("method") for r in self.rows if "method" in r), "?"))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    def scope(self, scope: str) -> list[dict]:
        return [r for r in self.rows if r.get("scope") == scope]

    @property
    def globals(self) -> list[dict]:
        return sorted(self.scope("global"), key=lambda r: r["round"])

    @property
    def links(self) -> list[dict]:
        return self.scope("link")

    def final(self, key: str):
        """The value of ``key`` in the last global row that has it (None if none)."""
        for row in reversed(self.globals):
            if isinstance(row.get(key), (int, float)):
                return float(row[key])
        return None

    def total(self, key: str) -> float | None:
        """Sum of ``key`` over link rows (falls back to global per-round totals)."""
        links = [r[key] for r in self.links if isinstance(r.get(key), (int, float))]
        if links:
            return float(sum(links))
        rows = [r[key] for r in self.globals if r["round"] >= 1 and isinstance(r.get(key), (int, float))]
        return float(sum(rows)) if rows else None

    def per_round_link_sum(self, key: str) -> dict[int, float]:
        out: dict[int, float] = defaultdict(float)
        for r in self.links:
            if isinstance(r.get(key), (int, float)):
                out[r["round"]] += r[key]
        return dict(sorted(out.items()))

    def final_user_mean(self, key: str) -> float | None:
        """Mean over users of ``key`` at the last round where user rows have it (None if none)."""
        users = [r for r in self.scope("user") if isinstance(r.get(key), (int, float))]
        if not users:
            return None
        last = max(r["round"] for r in users)
        return float(np.mean([r[key] for r in users if r["round"] == last]))

    def final_user_values(self) -> tuple[str, dict[int, float]] | None:
        """(metric, {user: value}) at the last round with per-user accuracy, or None."""
        for key in ("student_accuracy", "accuracy"):
            users = [r for r in self.scope("user") if isinstance(r.get(key), (int, float))]
            if users:
                last = max(r["round"] for r in users)
                return key, {int(r["user"]): float(r[key]) for r in users if r["round"] == last}
        return None


def _is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file()


def load_run(path: Path) -> RunData:
    path = Path(path)
    config = {}
    if (path / "config.toml").is_file():
        try:
            config = tomllib.loads((path / "config.toml").read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path / 'config.toml'}: not valid TOML ({exc})") from None
    return RunData(path=path, config=config, rows=read_jsonl(path / "metrics.jsonl"))


def load_runs(dirs: Iterable[str | Path]) -> list[RunData]:
    """Every run directory in ``dirs``; a folder that is not a run contributes its run subfolders."""
    found: list[Path] = []
    for d in dirs:
        d = Path(d)
        if _is_run(d):
            found.append(d)
        elif d.is_dir():
            found.extend(sub for sub in sorted(d.iterdir()) if sub.is_dir() and _is_run(sub))
    runs, seen = [], set()
    for path in found:  # a run named twice (a sweep folder and one of its runs) is one seed, not two
        if path.resolve() not in seen:
            seen.add(path.resolve())
            runs.append(load_run(path))
    return runs


def seedless_name(run: RunData) -> str:
    """The run's name without its seed: ``__s0`` from sweeps, ``-s0`` from ``semfl run``, ``-s0-flower``
    from ``semfl deploy local`` (-> ``-flower``) and ``-seed0`` from ``flwr run``."""
    name = re.sub(rf"(__|-)(s|seed){run.seed}(?=$|-)", "", run.name)
    return name or run.name


def group_runs(runs: list[RunData], key: Callable[[RunData], str] = seedless_name) -> dict[str, list[RunData]]:
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return groups


# ------------------------------------------------------------------ numbers
