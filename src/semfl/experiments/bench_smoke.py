"""The `smoke` part of `semfl bench`: how long `semfl run configs/smoke.toml` takes, end to end.

Each point is a fresh `semfl run` process (imports, data, classifier, 3 rounds, SNR sweep, figures,
report), timed by wall clock and by its CPU seconds (user + system, children included): on a shared
machine the wall time swings with other processes' load, the CPU time much less. "cold" starts
with an empty classifier cache (a newcomer's first run trains the frozen ResNet classifier), "warm"
is the same command again, with the classifier cached.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOKE_CONFIG = "configs/smoke.toml"


def _timed_run(repo: Path, out: Path, cache: Path, threads: int, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    argv = [sys.executable, "-m", "semfl.cli", "run", SMOKE_CONFIG, "--quiet", "--out", str(out),
            "--set", f"classifier.cache_dir={cache}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    tic = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=repo)
    wall = time.perf_counter() - tic
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"semfl run {SMOKE_CONFIG} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "load_avg": os.getloadavg()[0]}


def smoke_runs(repo: Path, threads: tuple[int, ...] = (1, 2), timeout: float = 900) -> list[dict]:
    """Cold and warm `semfl run configs/smoke.toml` at each torch thread count."""
    rows = []
    for n in threads:
        with tempfile.TemporaryDirectory(prefix="semfl-smoke-") as tmp:
            cache = Path(tmp) / "cache"
            for state in ("cold", "warm"):
                run = _timed_run(repo, Path(tmp) / state, cache, n, timeout)
                rows.append({"threads": n, "classifier": state, **run})
    return rows


def markdown_lines(rows: list[dict]) -> list[str]:
    lines = ["## Smoke run (`semfl run configs/smoke.toml`, a fresh process each)", "",
             "| torch threads | classifier | wall (s) | CPU (s) | load average after |", "|---|---|---|---|---|"]
    lines += [f"| {r['threads']} | {'trained (cold cache)' if r['classifier'] == 'cold' else 'cached'} | "
              f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['load_avg']:.2f} |" for r in rows]
    return lines + ["", "Wall time is what a user waits; CPU time is the steadier figure on a shared machine "
                    "(with 1 thread and a quiet machine the two agree).", ""]
