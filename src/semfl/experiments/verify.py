"""`semfl verify PAPER`: a paper's claims (configs/claims/PAPER.toml), their runs, and a verdict table.

For each claim the runs come from its sweep, at the claims file's reporting seeds (or ``--seeds``):
only the points that the claims' groups name are run (``--run-missing``) or read (finished runs in
``--runs``, default ``runs/verify/PAPER/<sweep name>/``). Each claim then gets its paired
difference A − B over the seeds where both sides finished, the mean, a 95 % Student-t interval and
a verdict (:mod:`semfl.experiments.stats`). The table is printed (Markdown) and written with a
JSON copy to ``<runs>/verdicts.md`` / ``verdicts.json`` (or ``--out``).
"""
from __future__ import annotations

import hashlib
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from semfl.config import ConfigError
from semfl.experiments.claims import Claim, ClaimFile, claims_file, group_matches, load_claims, measure
from semfl.experiments.stats import CONFIDENCE, mean_interval, paired_difference
from semfl.experiments.verdicts import ClaimResult, _seeds_text, evaluate_groups, results_json, verdict_markdown  # noqa: F401


@dataclass
class Study:
    """One sweep at one set of overrides and seeds: the runs that some claims share."""
    file: Path
    sets: list[str]
    seeds: list[int]
    grid: object  # semfl.experiments.sweep.Sweep: the whole grid at these overrides and seeds
    sweep: object  # the same sweep holding only the points the claims need
    out: Path
    claims: list[Claim] = field(default_factory=list)
    points: dict[tuple[str, int], object] = field(default_factory=dict)  # (group, seed) -> Point
    runs: dict[str, object] = field(default_factory=dict)  # label -> RunData of its finished points (evaluate)
    unmatched: dict[str, str] = field(default_factory=dict)  # group -> why no point matches


def _match(study: Study, sweep, claim: Claim) -> None:
    from semfl.experiments.sweep import point_components

    for group in claim.groups:
        if group in study.unmatched or any(g == group for g, _ in study.points):
            continue
        found = {}
        for point in sweep.points:
            if group_matches(group, point_components(point)):
                seed = int(point.values.get("seed", point.raw.get("seed", 0)))
                if seed in found:
                    raise ConfigError(f"claim {claim.id}: groups: {group!r} matches several points of {study.file} "
                                      f"({found[seed].label}, {point.label}); name the axis values too")
                found[seed] = point
        if not found:
            variants = ", ".join(sorted({point_components(p)[0] for p in sweep.points}))
            study.unmatched[group] = f"no point of {study.file.name} matches group {group!r} (variants: {variants})"
        for seed, point in found.items():
            study.points[(group, seed)] = point


def plan_studies(claim_file: ClaimFile, runs_dir: Path, seeds: list[int] | None = None,
                 sets: list[str] | None = None, only: list[str] | None = None) -> list[Study]:
    """Group the (selected) claims by sweep, overrides and seeds, and find the points they need."""
    from semfl.experiments.sweep import Sweep, literal, load_sweep

    claims = claim_file.claims
    if only:
        unknown = sorted(set(only) - {c.id for c in claims})
        if unknown:
            raise ConfigError(f"--claims: unknown claim ids {unknown} (known: {', '.join(c.id for c in claims)})")
        claims = [c for c in claims if c.id in only]
    studies: dict[tuple, Study] = {}
    for claim in claims:
        claim_seeds = list(seeds) if seeds else claim_file.seeds_of(claim)
        all_sets = list(claim.sets) + list(sets or [])
        key = (claim.sweep, tuple(all_sets), tuple(claim_seeds))
        if key not in studies:
            full = load_sweep(claim.sweep, all_sets + [f"sweep.seed={literal(claim_seeds)}"])
            name = full.name if not claim.sets else \
                f"{full.name}-{hashlib.sha1(' '.join(claim.sets).encode()).hexdigest()[:8]}"
            studies[key] = Study(file=claim.sweep, sets=all_sets, seeds=claim_seeds, out=Path(runs_dir) / name,
                                 grid=full, sweep=Sweep(name=full.name, file=full.file, axes=full.axes,
                                                        variants=full.variants))
        study = studies[key]
        study.claims.append(claim)
        _match(study, study.grid, claim)
    for study in studies.values():
        needed = {id(p): p for p in study.points.values()}
        # seed by seed: a verify stopped part-way has whole pairs for the seeds it finished
        order = {id(p): i for i, p in enumerate(study.grid.points)}
        study.sweep.points = sorted((p for p in study.grid.points if id(p) in needed),
                                    key=lambda p: (study.seeds.index(int(p.values.get("seed", 0)))
                                                   if int(p.values.get("seed", 0)) in study.seeds else 0, order[id(p)]))
    return list(studies.values())


def run_missing(studies: list[Study], jobs: int = 1, quiet: bool = True) -> None:
    """Run (or resume) every needed point that has not finished, through the sweep machinery."""
    from semfl.experiments.sweep import run_sweep

    for study in studies:
        if study.sweep.points:
            run_sweep(study.sweep, study.out, study.sets, quiet=quiet, compare=False, jobs=jobs)


def _side_values(study: Study, runs: dict, group: str, metric: str, scope: str, at) -> dict[int, float | None]:
    out = {}
    for (g, seed), point in study.points.items():
        if g == group and point.label in runs:
            out[seed] = measure(runs[point.label], metric, scope, at)
    return out


def evaluate(studies: list[Study], confidence: float = CONFIDENCE) -> tuple[list[ClaimResult], float, int]:
    """Each claim's paired result from the finished runs; the runs' own wall time (s) summed; how many
    of the needed runs had finished."""
    from semfl.experiments.runs import load_run
    from semfl.experiments.sweep import plan

    results, run_wall, finished = [], 0.0, 0
    for study in studies:
        plan(study.sweep, study.out)
        runs = study.runs = {p.label: load_run(study.out / p.label) for p in study.sweep.points if p.state == "done"}
        finished += len(runs)
        run_wall += sum(r.final("wall_s") or 0.0 for r in runs.values())
        for claim in study.claims:
            notes = [study.unmatched[g] for g in claim.groups if g in study.unmatched]
            if notes:
                results.append(ClaimResult(claim, None, notes))
                continue
            for group in claim.groups:
                unfinished = sorted(s for (g, s), p in study.points.items() if g == group and p.label not in runs)
                if unfinished:
                    notes.append(f"{group}: no finished run for seeds {unfinished}")
                errors = sorted({p.error for (g, _), p in study.points.items() if g == group and p.state == "invalid"})
                notes += [f"{group}: {error}" for error in errors]
            a = _side_values(study, runs, claim.groups[0], claim.metric[0], claim.scope[0], claim.at[0])
            b = (_side_values(study, runs, claim.groups[1], claim.metric[1], claim.scope[1], claim.at[1])
                 if len(claim.groups) == 2 else claim.than)
            result = paired_difference(a, b, claim.direction, confidence)
            results.append(ClaimResult(claim, result, notes + result.notes))
    return results, run_wall, finished


def _start(config: dict) -> str:
    """Where a run's federated model starts: from scratch or from the pretrained foundation."""
    foundation = config.get("foundation", {})
    if config.get("method") == "psfl":
        return "student: scratch; mentors: foundation" if foundation.get("samples") else "scratch"
    return "foundation" if foundation.get("global_model") else "scratch"


def group_rows(studies: list[Study], confidence: float = CONFIDENCE) -> list[dict]:
    """One row per group the claims name: its start, objective, finished seeds, final accuracy and
    summed uplink energy (mean and 95 % interval over seeds), and how many of its runs converged.
    Reads the runs :func:`evaluate` loaded (``Study.runs``)."""
    rows = []
    for study in studies:
        groups = list(dict.fromkeys(g for c in study.claims for g in c.groups if g not in study.unmatched))
        for group in groups:
            runs = [study.runs[p.label] for (g, _), p in sorted(study.points.items(), key=lambda kv: kv[0][1])
                    if g == group and p.label in study.runs]
            first = runs[0] if runs else None
            summaries = [json.loads((r.path / "summary.json").read_text()) if (r.path / "summary.json").is_file()
                         else {} for r in runs]
            objective = next((row.get("train_objective") for row in first.rows if row.get("train_objective")),
                             None) if first else None
            rows.append({
                "study": study.out.name, "group": group, "method": first.method if first else None,
                # the model the run says it trained (summary.json), else its config's model.arch (older runs)
                "arch": (summaries[0].get("model") or first.config.get("model", {}).get("arch")) if first else None,
                "start": _start(first.config) if first else None, "objective": objective,
                "seeds": [r.seed for r in runs],
                "accuracy": mean_interval([measure(r, "accuracy", "global", "final") for r in runs], confidence),
                "uplink_energy_j": mean_interval([measure(r, "uplink_energy_j", "link_total", "final") for r in runs],
                                                 confidence),
                "converged": sum(bool(s.get("converged")) for s in summaries)})
    return rows


def _interval_text(values) -> str:
    mean, low, high = values
    if mean is None:
        return "–"
    return f"{mean:.4g}" + (f" [{low:.4g}, {high:.4g}]" if low is not None else "")


def group_markdown(rows: list[dict]) -> str:
    """The groups the claims compare, side by side (bounds and contenders in one table)."""
    lines = ["#### The groups compared", "",
             "Each group's final global accuracy and summed uplink energy over its finished seeds: mean and 95 % "
             "Student-t interval of the mean (not paired; the verdicts above pair by seed). *start*: where the "
             "federated model's weights begin; *objective*: the training loss and optimiser each run stated "
             "(metrics row 0). *converged*: runs whose global loss flattened (`semfl.convergence`).", "",
             "| group | method (model) | start | objective | seeds | accuracy [95 % CI] | uplink energy J [95 % CI] "
             "| converged |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seeds = f"{len(r['seeds'])} ({_seeds_text(r['seeds'])})" if r["seeds"] else "0"
        lines.append("| " + " | ".join([
            f"`{r['group']}`", f"{r['method'] or '–'} ({r['arch'] or '–'})", r["start"] or "–",
            f"`{r['objective']}`".replace("|", "\\|") if r["objective"] else "–", seeds, _interval_text(r["accuracy"]),
            _interval_text(r["uplink_energy_j"]), f"{r['converged']} of {len(r['seeds'])}"]) + " |")
    return "\n".join(lines) + "\n"


def _command_line(args) -> str:
    parts = ["semfl", "verify", args.paper]
    if args.runs:
        parts += ["--runs", args.runs]
    if args.seeds:
        parts += ["--seeds", *map(str, args.seeds)]
    for s in args.set:
        parts += ["--set", s]
    if args.claims:
        parts += ["--claims", *args.claims]
    if args.run_missing:
        parts.append("--run-missing")
    if args.jobs != 1:
        parts += ["--jobs", str(args.jobs)]
    return " ".join(shlex.quote(p) for p in parts)


def cmd_verify(args) -> int:
    from semfl.files import atomic_text

    tic = time.perf_counter()
    if args.jobs < 1:
        raise ConfigError(f"--jobs: must be >= 1, got {args.jobs}")
    claim_file = load_claims(claims_file(args.paper))
    runs_dir = Path(args.runs) if args.runs else Path("runs") / "verify" / claim_file.paper
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds: repeated seeds in {args.seeds}")
    studies = plan_studies(claim_file, runs_dir, args.seeds, args.set, args.claims)
    from semfl.experiments.sweep import plan, require_a_valid_point

    for study in studies:
        plan(study.sweep, study.out)  # reads only
    require_a_valid_point([p for study in studies for p in study.sweep.points], "no run the claims need is valid")
    if args.run_missing:
        run_missing(studies, jobs=args.jobs)
    results, run_wall, finished = evaluate(studies)
    needed = sum(len(st.sweep.points) for st in studies)
    wall = time.perf_counter() - tic
    seeds_used = sorted({s for st in studies for s in st.seeds})
    tuning_used = sorted(set(seeds_used) & set(claim_file.tuning_seeds))
    header = [f"Command: `{_command_line(args)}` ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC).",
              f"Claims: `{claim_file.path}`; runs: `{runs_dir}` "
              f"({', '.join(f'`{st.out.name}`' for st in studies)}).",
              f"Seeds asked for: {_seeds_text(seeds_used)} (the rows say which paired). Seeds the defaults were chosen on (tuning, "
              f"not used for verdicts): {_seeds_text(claim_file.tuning_seeds)}."
              + (f" **Warning: seeds {_seeds_text(tuning_used)} are tuning seeds.**" if tuning_used else ""),
              "Each row: the paired difference A − B per seed (both sides ran with the same seed), its mean and "
              "the 95 % Student-t interval (t quantile at 0.975 with n − 1 degrees of freedom, n = seeds paired); "
              "verdict *holds* / *reversed* when the interval lies wholly on the claimed / the other side of 0, "
              "*undecided* when it contains 0 or n < 2.",
              f"Overrides: {', '.join(f'`{s}`' for s in args.set) or 'none'}.",
              f"Runs: {finished} of the {needed} the claims need had finished"
              + ("." if finished == needed or args.run_missing else " (`--run-missing` runs the others)."),
              f"Wall time: {wall:.0f} s for this command; the runs read took {run_wall:.0f} s of their own "
              "(sum of their wall_s)."]
    groups = group_rows(studies)
    markdown = verdict_markdown(results, f"semfl verify {claim_file.paper}", header) + "\n" + group_markdown(groups)
    print(markdown)
    out = Path(args.out) if args.out else runs_dir / "verdicts.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(out, markdown)
    atomic_text(out.with_suffix(".json"), json.dumps(
        {"paper": claim_file.paper, "command": _command_line(args), "seeds": seeds_used,
         "tuning_seeds": claim_file.tuning_seeds, "confidence": CONFIDENCE, "wall_s": wall, "runs_wall_s": run_wall,
         "claims": results_json(results), "groups": groups}, indent=1))
    print(f"verdicts: {out}", file=sys.stderr)
    return 0


__all__ = ["Study", "ClaimResult", "group_markdown", "group_rows", "plan_studies", "run_missing", "evaluate", "evaluate_groups", "verdict_markdown", "results_json",
           "cmd_verify"]
