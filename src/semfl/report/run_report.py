"""report.html for one run: curves, link box plots, partition, reconstructions, SNR sweep."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from semfl.report import plots
from semfl.files import atomic_text, read_jsonl

GLOBAL_KEYS = ("loss", "accuracy", "psnr_db", "ssim")
ROUND_KEYS = ("prune_ratio", "uplink_bits", "uplink_energy_j", "downlink_energy_j", "objective", "epsilon")


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}"><figcaption>{html.escape(path.name)}</figcaption></figure>'


def _table(rows: list[dict], keys: list[str]) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = ""
    for r in rows:
        cells = "".join(f"<td>{_fmt(r.get(k, ''))}</td>" for k in keys)
        body += f"<tr>{cells}</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _sweep_table(run_dir: Path) -> str:
    """snr_sweep.json as a table: a row per model or baseline curve, PSNR (dB) / accuracy per SNR."""
    path = run_dir / "snr_sweep.json"
    if not path.is_file():
        return ""
    sweep = json.loads(path.read_text())
    snrs = [f"{s:g} dB" for s in sweep["snr_db"]]
    rows = [{"model": label, **{snr: " / ".join(_fmt(v[k][i]) for k in ("psnr_db", "accuracy") if k in v)
                                for i, snr in enumerate(snrs)}} for label, v in sweep["models"].items()]
    return f"<h2>SNR sweep (PSNR dB / accuracy)</h2>{_table(rows, ['model'] + snrs)}"


STYLE = """body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}
img{max-width:100%}figure{display:inline-block;margin:.5em}table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}.warn{color:#a00;font-weight:bold}pre{background:#f4f4f4;padding:.5em;font-size:11px}"""


def write_run_report(run_dir: Path, summary: dict | None = None) -> Path:
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    figs = run_dir / "figures"
    made = [
        plots.curves(rows, GLOBAL_KEYS, figs / "global_metrics.png", "global model on the test set"),
        plots.mentor_student(rows, figs / "mentor_vs_student.png"),
        plots.curves(rows, ROUND_KEYS, figs / "round_metrics.png", "per round"),
        plots.link_boxes(rows, figs / "link_per_round.png"),
    ]
    part_path = run_dir / "partition.json"
    if part_path.is_file():
        try:
            histogram = json.loads(part_path.read_text())["class_histogram"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{part_path}: not a partition record ({type(exc).__name__}: {exc})") from None
        made.append(plots.partition(histogram, figs / "partition.png"))
    extra = [figs / name for name in ("reconstructions.png", "snr_sweep.png", "features.png")]
    images = [p for p in made if p] + [p for p in extra if p.is_file()]
    globals_ = [r for r in rows if r.get("scope") == "global"]
    keys = ["round"] + [k for k in GLOBAL_KEYS + ROUND_KEYS + ("wall_s",) if any(k in r for r in globals_)]
    config = (run_dir / "config.toml").read_text() if (run_dir / "config.toml").is_file() else ""
    summary_html = _table([summary], list(summary)) if summary else ""
    if summary and summary.get("converged") is False:  # a run stopped before its curve flattened
        summary_html = f'<p class="warn">{html.escape(str(summary.get("convergence", "not converged")))}</p>' + summary_html
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>semfl run {html.escape(run_dir.name)}</title>
<style>{STYLE}</style></head><body><h1>semfl run: {html.escape(run_dir.name)}</h1>
{summary_html}<h2>Figures</h2>{''.join(_img(p) for p in images) if plots.enabled() else '<p>not drawn (log.figures = false)</p>'}
<h2>Global metrics per round</h2>{_table(globals_, keys)}
{_sweep_table(run_dir)}
<h2>Config</h2><pre>{html.escape(config)}</pre></body></html>"""
    atomic_text(run_dir / "report.html", page)
    return run_dir / "report.html"
