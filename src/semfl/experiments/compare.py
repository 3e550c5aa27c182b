"""Comparison report over many run directories (a sweep, or any runs): `semfl compare DIR...`.

Reusable pieces (other reports add their own plots on top):

- :func:`load_runs` — run directories (or folders of them) → :class:`RunData`;
- :func:`group_runs` — runs → ``{group: [runs]}``; by default the run's name without its seed
  suffix (``psfl-no-pld__alpha0.1__s0`` → ``psfl-no-pld__alpha0.1``), i.e. one group per
  method/variant, the seeds of a group being its repetitions;
- ``plot_*`` functions take the groups and a path and return the path (or None when the runs hold
  nothing to plot);
- :func:`summarise` — the numbers of the summary table, :func:`write_comparison` — everything.

Summary numbers (per run, then mean and sample std over the runs of a group; std is 0 for one run):
final accuracy / PSNR / SSIM are the last global row that has them; total uplink (downlink) bits
and energy are sums over all ``link`` rows (every user, every round); wall time is the last
global row's cumulative ``wall_s``.
"""
from __future__ import annotations

import html
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from matplotlib.ticker import MaxNLocator

from semfl.report import plots
from semfl.report.plots import plt, save
from semfl.files import atomic_text
from semfl.experiments.runs import RunData, _is_run, group_runs, load_run, load_runs, seedless_name  # noqa: F401


SUMMARY_KEYS = {  # column -> (function of a run, label)
    "final_accuracy": (lambda r: r.final("accuracy"), "final accuracy"),
    "final_psnr_db": (lambda r: r.final("psnr_db"), "final PSNR (dB)"),
    "final_ssim": (lambda r: r.final("ssim"), "final SSIM"),
    "total_uplink_bits": (lambda r: r.total("uplink_bits"), "uplink bits"),
    "total_downlink_bits": (lambda r: r.total("downlink_bits"), "downlink bits"),
    "total_energy_j": (lambda r: _sum_or_none(r.total("uplink_energy_j"), r.total("downlink_energy_j")),
                       "up+down energy (J)"),
    "wall_s": (lambda r: r.final("wall_s"), "wall time (s)"),
    # shown only where some run has them: PSFL's Figs 9-10 and FedProto's second inference rule
    "final_mentor_loss": (lambda r: r.final_user_mean("mentor_loss"), "mentor loss (mean over users)"),
    "final_student_loss": (lambda r: r.final_user_mean("student_loss"), "student loss (mean over users)"),
    "final_proto_accuracy": (lambda r: r.final("proto_accuracy"), "nearest-prototype accuracy"),
}


def shown_columns(summary: dict[str, dict]) -> list[str]:
    """The summary columns that at least one group has a value for."""
    return [c for c in SUMMARY_KEYS if any(e[c]["mean"] is not None for e in summary.values())]


def _sum_or_none(*values):
    values = [v for v in values if v is not None]
    return float(sum(values)) if values else None


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarise(groups: dict[str, list[RunData]]) -> dict[str, dict]:
    out = {}
    for name, runs in groups.items():
        entry: dict = {"runs": [r.name for r in runs], "seeds": [r.seed for r in runs],
                       "method": runs[0].method, **objective_and_convergence(runs)}
        for key, (fn, _) in SUMMARY_KEYS.items():
            values = [fn(r) for r in runs]
            entry[key] = {"mean": mean_std(values)[0], "std": mean_std(values)[1], "values": values}
        out[name] = entry
    return out


def objective_and_convergence(runs: list[RunData]) -> dict:
    """What the group trained on (metrics row 0's train_objective, semfl.objective) and how many of its
    runs passed the convergence test (the final row's ``converged``, semfl.convergence)."""
    objectives = sorted({str(r.globals[0]["train_objective"]) for r in runs if r.globals and "train_objective" in r.globals[0]})
    verdicts = [r.globals[-1].get("converged") for r in runs if r.globals]
    return {"objective": " / ".join(objectives) or "not recorded",
            "converged": f"{sum(v is True for v in verdicts)}/{len(runs)}"}


# ------------------------------------------------------------------ figures

def _colours(groups) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    return {g: cmap(i % cmap.N) for i, g in enumerate(groups)}


def _band(runs: list[RunData], key: str, scope_fn=None) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """Rounds, mean, min, max over runs of a per-round series (runs may miss rounds)."""
    per_round = defaultdict(list)
    for run in runs:
        xs, ys = scope_fn(run.rows, key) if scope_fn else plots.series(run.rows, key)
        for x, y in zip(xs, ys):
            per_round[x].append(y)
    rounds = sorted(per_round)
    vals = [np.asarray(per_round[t], dtype=float) for t in rounds]
    return (rounds, np.array([v.mean() for v in vals]), np.array([v.min() for v in vals]),
            np.array([v.max() for v in vals]))


def plot_curves(groups: dict[str, list[RunData]], path: Path,
                keys: tuple[str, ...] = ("loss", "accuracy", "psnr_db", "ssim")) -> Path | None:
    """Per-round global metrics: mean over seeds, min-max shaded, one line per group."""
    keys = tuple(k for k in keys if any(plots.series(r.rows, k)[0] for runs in groups.values() for r in runs))
    if not keys:
        return None
    colours = _colours(groups)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, runs in groups.items():
            x, mean, lo, hi = _band(runs, key)
            if not x:
                continue
            ax.plot(x, mean, "-o", ms=3, color=colours[name], label=name)
            if len(runs) > 1:
                ax.fill_between(x, lo, hi, color=colours[name], alpha=0.2)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"global {key}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.suptitle("global model per round (mean over seeds, min-max shaded)", fontsize=9)
    return save(fig, path)


def plot_user_accuracy(groups: dict[str, list[RunData]], path: Path, notes: list[str] | None = None) -> Path | None:
    """Final per-user local accuracy, grouped bars: users on x, one bar per group (mean over seeds)."""
    data: dict[str, tuple[str, dict[int, list[float]]]] = {}
    for name, runs in groups.items():
        per_user: dict[int, list[float]] = defaultdict(list)
        metric = None
        for run in runs:
            found = run.final_user_values()
            if found:
                metric = found[0]
                for u, v in found[1].items():
                    per_user[u].append(v)
        if metric is None:
            if notes is not None:
                notes.append(f"{name}: no per-user accuracy in its metrics; left out of the per-user bars")
            continue
        data[name] = (metric, per_user)
    if not data:
        return None
    users = sorted({u for _, pu in data.values() for u in pu})
    colours = _colours(groups)
    width = 0.8 / len(data)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(users) * max(1, len(data)) / 2 + 3), 3.5))
    for i, (name, (metric, per_user)) in enumerate(data.items()):
        xs = [u + (i - (len(data) - 1) / 2) * width for u in users]
        means = [float(np.mean(per_user[u])) if per_user.get(u) else 0.0 for u in users]
        errs = [mean_std(per_user[u])[1] or 0.0 if per_user.get(u) else 0.0 for u in users]
        label = name if metric == "accuracy" else f"{name} ({metric.split('_')[0]})"
        ax.bar(xs, means, width, yerr=errs if any(errs) else None, color=colours[name], label=label, capsize=2)
    ax.set_xticks(users)
    ax.set_xlabel("user")
    ax.set_ylabel("local accuracy (final round)")
    ax.set_title("final per-user accuracy (mean ± std over seeds)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    return save(fig, path)


def plot_energy_boxes(groups: dict[str, list[RunData]], path: Path, key: str = "uplink_energy_j") -> Path | None:
    """One box per group of the per-round sum over users of ``key`` (all rounds, all seeds)."""
    data = {name: [v for run in runs for v in run.per_round_link_sum(key).values()] for name, runs in groups.items()}
    data = {k: v for k, v in data.items() if v}
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(data) + 2), 3.6))
    ax.boxplot(list(data.values()), tick_labels=list(data))
    ax.set_ylabel(f"{key} per round (sum over users)")
    ax.set_title("uplink energy per round" if key == "uplink_energy_j" else key)
    ax.tick_params(axis="x", rotation=30, labelsize=7)
    ax.grid(alpha=0.3, axis="y")
    return save(fig, path)


def plot_accuracy_energy(groups: dict[str, list[RunData]], path: Path) -> Path | None:
    """Final accuracy vs total up+downlink energy, one point per run, coloured by group."""
    colours = _colours(groups)
    fig, ax = plt.subplots(figsize=(6, 4))
    any_point = False
    for name, runs in groups.items():
        pts = [(SUMMARY_KEYS["total_energy_j"][0](r), r.final("accuracy")) for r in runs]
        pts = [p for p in pts if None not in p]
        if pts:
            any_point = True
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=colours[name], label=name, s=30)
    if not any_point:
        plt.close(fig)
        return None
    ax.set_xlabel("total uplink + downlink energy (J)")
    ax.set_ylabel("final accuracy")
    ax.set_title("accuracy versus energy (one point per run)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    return save(fig, path)


def plot_mentor_student(groups: dict[str, list[RunData]], path: Path) -> Path | None:
    """PSFL groups: mean over users and seeds of mentor vs student accuracy per round."""
    groups = {n: rs for n, rs in groups.items()
              if any(plots.user_mean_series(r.rows, "mentor_accuracy")[0] for r in rs)}
    if not groups:
        return None
    colours = _colours(groups)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, runs in groups.items():
        for key, style in (("mentor_accuracy", "-o"), ("student_accuracy", "--s")):
            x, mean, lo, hi = _band(runs, key, plots.user_mean_series)
            if x:
                ax.plot(x, mean, style, ms=3, color=colours[name], label=f"{name} {key.split('_')[0]}")
                if len(runs) > 1:
                    ax.fill_between(x, lo, hi, color=colours[name], alpha=0.12)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy (mean over users)")
    ax.set_title("mentor (solid) vs student (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    return save(fig, path)


# ------------------------------------------------------------------ report

def _fmt(mean, std, key: str) -> str:
    if mean is None:
        return "–"
    return f"{mean:.4g} ± {std:.2g}"


def summary_markdown(summary: dict[str, dict]) -> str:
    cols = shown_columns(summary)
    head = "| group | runs | " + " | ".join(SUMMARY_KEYS[c][1] for c in cols) + " | converged | trained on |\n"
    head += "|---" * (len(cols) + 4) + "|\n"
    body = ""
    for name, entry in summary.items():
        cells = [_fmt(entry[c]["mean"], entry[c]["std"], c) for c in cols]
        cells += [entry.get("converged", "–"), entry.get("objective", "–").replace("|", "\\|")]
        body += f"| {name} | {len(entry['runs'])} | " + " | ".join(cells) + " |\n"
    return head + body


def _img(path: Path) -> str:
    from semfl.report.run_report import _img as img

    return img(path)


def write_comparison(dirs: Iterable[str | Path], out: str | Path, title: str = "comparison",
                     key: Callable[[RunData], str] = seedless_name, claims: str | Path | None = None) -> Path:
    """Figures, summary.json, summary.md and report.html for the runs in ``dirs``, written to ``out``;
    with ``claims`` (a claims file) also each claim's paired difference, 95 % interval and verdict."""
    from semfl.report.run_report import STYLE

    out = Path(out)
    runs = load_runs(dirs)
    if not runs:
        raise ValueError(f"no run directories (with metrics.jsonl) in {', '.join(map(str, dirs))}")
    groups = group_runs(runs, key)
    figs = out / "figures"
    notes: list[str] = []
    made = [
        plot_curves(groups, figs / "compare_curves.png"),
        plot_user_accuracy(groups, figs / "compare_user_accuracy.png", notes),
        plot_energy_boxes(groups, figs / "compare_uplink_energy.png"),
        plot_accuracy_energy(groups, figs / "compare_accuracy_energy.png"),
        plot_mentor_student(groups, figs / "compare_mentor_student.png"),
    ]
    summary = summarise(groups)
    verdicts_md, verdicts = _claims_section(claims, groups)
    atomic_text(out / "summary.json", json.dumps({"title": title, "groups": summary,
                                                  "std": "sample standard deviation over the group's runs (0 for one run)",
                                                  **({"claims": verdicts} if claims else {})},
                                                 indent=1))
    md = f"# {title}\n\n{summary_markdown(summary)}\n" + "".join(f"- {n}\n" for n in notes)
    atomic_text(out / "summary.md", md + (f"\n{verdicts_md}" if claims else ""))
    cols = shown_columns(summary)
    head = ("<tr><th>group</th><th>runs</th>" + "".join(f"<th>{html.escape(SUMMARY_KEYS[c][1])}</th>" for c in cols)
            + "<th>converged</th><th>trained on</th></tr>")
    body = "".join(
        f"<tr><td style='text-align:left'>{html.escape(n)}</td><td>{len(e['runs'])}</td>"
        + "".join(f"<td>{html.escape(_fmt(e[c]['mean'], e[c]['std'], c))}</td>" for c in cols)
        + f"<td>{html.escape(e['converged'])}</td><td style='text-align:left'>{html.escape(e['objective'])}</td></tr>"
        for n, e in summary.items())
    run_list = "".join(f"<li>{html.escape(n)}: " + ", ".join(
        f"<a href='{html.escape(_rel(r.path, out))}/report.html'>{html.escape(r.name)}</a>" for r in rs) + "</li>"
        for n, rs in groups.items())
    note_html = "".join(f"<p><em>{html.escape(n)}</em></p>" for n in notes)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>semfl {html.escape(title)}</title>
<style>{STYLE}</style></head><body><h1>semfl {html.escape(title)}</h1>
<p>{len(runs)} runs in {len(groups)} groups (a group = a run name without its seed; mean ± sample std over seeds)</p>
<table>{head}{body}</table>{note_html}
{_markdown_table_html(verdicts_md) if claims else ""}
<h2>Figures</h2>{''.join(_img(p) for p in made if p)}
<h2>Runs</h2><ul>{run_list}</ul></body></html>"""
    atomic_text(out / "report.html", page)
    return out / "report.html"


def _claims_section(claims: str | Path | None, groups: dict[str, list[RunData]]) -> tuple[str, list[dict]]:
    """The claims' verdict table (Markdown) and its JSON entries, or ("", []) without a claims file."""
    if not claims:
        return "", []
    from semfl.experiments.claims import load_claims
    from semfl.experiments.verdicts import evaluate_groups, results_json, verdict_markdown

    claim_file = load_claims(claims)
    results = evaluate_groups(claim_file, groups)
    header = [f"Claims: `{claims}`. Each row: A − B per seed (runs paired by seed), its mean and 95 % Student-t "
              "interval; *holds* / *reversed* when the interval is wholly on the claimed / the other side of 0, "
              "*undecided* when it contains 0 or fewer than 2 seeds pair. Tuning seeds (defaults chosen on them): "
              + ", ".join(map(str, claim_file.tuning_seeds)) + "."]
    return verdict_markdown(results, "claims", header), results_json(results)


def _markdown_table_html(markdown: str) -> str:
    """The verdict table's Markdown as HTML (a heading, paragraphs, one table and a list)."""
    parts, rows = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            if not line.startswith("|---"):
                rows.append([c.strip() for c in line.strip("|").split(" | ")])
            continue
        if rows:
            head, *body = rows
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c.replace('**', ''))}</td>" for c in r)
                                   + "</tr>" for r in body) + "</table>")
            rows = []
        if line.startswith("### "):
            parts.append(f"<h2>{html.escape(line[4:])}</h2>")
        elif line.startswith("- "):
            parts.append(f"<p>{html.escape(line)}</p>")
        elif line.strip():
            parts.append(f"<p>{html.escape(line)}</p>")
    return "".join(parts)


def _rel(path: Path, start: Path) -> str:
    import os

    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:
        return str(path.resolve())


def cmd_compare(args) -> int:
    dirs = [Path(d) for d in args.dirs]
    if args.out:
        out = Path(args.out)
    elif len(dirs) == 1 and not _is_run(dirs[0]):
        out = dirs[0]
    else:
        out = Path("runs") / "compare"
    if not load_runs(dirs):
        print(f"semfl: error: no run directories (with metrics.jsonl) in {', '.join(map(str, dirs))}", file=sys.stderr)
        return 2
    path = write_comparison(dirs, out, title=args.title or "comparison", claims=getattr(args, "claims", None))
    print(f"report: {path}")
    return 0


__all__ = ["RunData", "load_runs", "load_run", "group_runs", "seedless_name", "summarise", "plot_curves",
           "plot_user_accuracy", "plot_energy_boxes", "plot_accuracy_energy", "plot_mentor_student",
           "write_comparison", "cmd_compare"]
