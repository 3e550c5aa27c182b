"""Claims measured on finished runs: each claim's paired result, the verdict table (Markdown) and its JSON.
Shared by `semfl verify` and `semfl compare --claims`."""
from __future__ import annotations

from dataclasses import dataclass, field

from semfl.experiments.claims import Claim, ClaimFile, group_matches, measure
from semfl.experiments.stats import CONFIDENCE, PairedResult, paired_difference


@dataclass
class ClaimResult:
    claim: Claim
    result: PairedResult | None
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return self.result.verdict if self.result is not None and self.result.n else "not run"


def evaluate_groups(claim_file: ClaimFile, groups: dict[str, list], confidence: float = CONFIDENCE) -> list[ClaimResult]:
    """Each claim on runs already grouped by name without the seed (``semfl compare``): a claim's group
    matches the compare group whose ``__``-separated parts include all of its parts; seeds pair runs."""
    results = []
    for claim in claim_file.claims:
        sides, notes = [], []
        for group in claim.groups:
            found = [name for name in groups if group_matches(group, name.split("__"))]
            if len(found) != 1:
                notes.append(f"group {group!r} matches " + (f"several run groups ({', '.join(found)})" if found
                                                            else "no run group"))
            sides.append(groups[found[0]] if len(found) == 1 else None)
        if notes:
            results.append(ClaimResult(claim, None, notes))
            continue
        values = [{run.seed: measure(run, claim.metric[i], claim.scope[i], claim.at[i]) for run in runs}
                  for i, runs in enumerate(sides)]
        result = paired_difference(values[0], values[1] if len(values) == 2 else claim.than, claim.direction,
                                   confidence)
        tuning = sorted(set(result.seeds) & set(claim_file.tuning_seeds))
        if tuning:
            notes.append(f"seeds {tuning} are tuning seeds")
        results.append(ClaimResult(claim, result, notes + result.notes))
    return results


# ------------------------------------------------------------------ the table

def _num(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def _seeds_text(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds))


def verdict_markdown(results: list[ClaimResult], title: str, header_lines: list[str]) -> str:
    lines = [f"### {title}", ""] + header_lines + [""]
    lines.append("| claim | A − B (claimed " + "sign) | seeds paired | A mean | B mean | mean A − B [95 % CI] | verdict | notes |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in results:
        c, res = r.claim, r.result
        sign = ">" if c.direction == "greater" else "<"
        cells = [f"`{c.id}`: {c.text}", f"{c.describe()} {sign} 0"]
        if res is None:
            cells += ["0", "–", "–", "–"]
        else:
            a_mean = sum(res.a) / res.n if res.n else None
            b_mean = sum(res.b) / res.n if res.n else None
            ci = f" [{_num(res.low)}, {_num(res.high)}]" if res.low is not None else " (no interval)"
            cells += [f"{res.n} ({_seeds_text(res.seeds)})" if res.n else "0", _num(a_mean), _num(b_mean),
                      _num(res.mean) + ci]
        cells += [f"**{r.verdict}**", "; ".join(r.notes).replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    differs = [(r.claim.id, r.claim.differs) for r in results if r.claim.differs]
    if differs:
        lines += ["", "What differs from the paper's set-up:", ""]
        lines += [f"- `{cid}`: {text}" for cid, text in differs]
    return "\n".join(lines) + "\n"


def results_json(results: list[ClaimResult]) -> list[dict]:
    out = []
    for r in results:
        c, res = r.claim, r.result
        entry = {"id": c.id, "text": c.text, "figure": c.figure, "comparison": c.describe(), "direction": c.direction,
                 "verdict": r.verdict, "notes": r.notes, "differs": c.differs}
        if res is not None:
            entry.update({"seeds": res.seeds, "a": res.a, "b": res.b, "diffs": res.diffs, "mean": res.mean,
                          "sd": res.sd, "ci95": [res.low, res.high] if res.low is not None else None, "t": res.t})
        out.append(entry)
    return out


# ------------------------------------------------------------------ CLI
