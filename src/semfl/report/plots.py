"""Matplotlib figures shared by run and sweep reports (Agg backend, PNG files)."""
from __future__ import annotations

import functools
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


_drawing = [True]  # log.figures of the run being finished (see drawing())


@contextmanager
def drawing(on: bool):
    """Within it, ``save`` draws (True) or drops (False) figures: a run with ``log.figures = false``
    keeps its metrics and report tables and skips the seconds of rendering."""
    _drawing.append(bool(on))
    try:
        yield
    finally:
        _drawing.pop()


def enabled() -> bool:
    """Whether figures are being drawn (costly inputs of a figure, like an embedding, can be skipped)."""
    return _drawing[-1]


def drawn(figure_function):
    """A figure function that returns None at once, drawing nothing, when drawing is off."""
    @functools.wraps(figure_function)
    def wrapper(*args, **kwargs):
        return figure_function(*args, **kwargs) if enabled() else None
    return wrapper


def save(fig, path: Path) -> Path | None:
    """Write ``fig`` as a PNG at ``path`` and close it; None (nothing written) when drawing is off."""
    if not enabled():
        plt.close(fig)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def series(rows: list[dict], key: str, scope: str = "global") -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in rows if r.get("scope") == scope and isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def user_mean_series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    per_round = defaultdict(list)
    for r in rows:
        if r.get("scope") == "user" and isinstance(r.get(key), (int, float)):
            per_round[r["round"]].append(r[key])
    rounds = sorted(per_round)
    return rounds, [float(np.mean(per_round[t])) for t in rounds]


@drawn
def curves(rows: list[dict], keys: Sequence[str], path: Path, title: str = "") -> Path | None:
    keys = [k for k in keys if series(rows, k)[0]]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        x, y = series(rows, key)
        ax.plot(x, y, marker="o", ms=3)
        ax.set_xlabel("round")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save(fig, path)


@drawn
def mentor_student(rows: list[dict], path: Path) -> Path | None:
    """Mean over users of mentor_* vs student_* per round (PSFL Figs 9-10)."""
    pairs = [("mentor_loss", "student_loss"), ("mentor_accuracy", "student_accuracy")]
    if not user_mean_series(rows, "mentor_loss")[0]:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, (a, b) in zip(axes, pairs):
        for key, style in ((a, "-o"), (b, "--s")):
            x, y = user_mean_series(rows, key)
            ax.plot(x, y, style, ms=3, label=key.split("_")[0])
        ax.set_title(a.split("_")[1] + " (mean over users)")
        ax.set_xlabel("round")
        ax.legend()
        ax.grid(alpha=0.3)
    return save(fig, path)


@drawn
def link_boxes(rows: list[dict], path: Path) -> Path | None:
    """Box plots per round across users: uplink energy and bits."""
    link = [r for r in rows if r.get("scope") == "link"]
    if not link:
        return None
    rounds = sorted({r["round"] for r in link})
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.35 * len(rounds) * 2), 3.2))
    for ax, key, label in ((axes[0], "uplink_energy_j", "uplink energy per user (J)"),
                           (axes[1], "uplink_bits", "uplink bits per user")):
        data = [[r[key] for r in link if r["round"] == t] for t in rounds]
        ax.boxplot(data, tick_labels=[str(t) for t in rounds])
        ax.set_xlabel("round")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if len(rounds) > 20:
            ax.set_xticks(ax.get_xticks()[:: max(1, len(rounds) // 10)])
    return save(fig, path)


@drawn
def partition(hist: np.ndarray, path: Path) -> Path:
    hist = np.asarray(hist)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * hist.shape[0] + 2), 3.2))
    bottom = np.zeros(hist.shape[0])
    cmap = plt.get_cmap("tab20", hist.shape[1])
    for c in range(hist.shape[1]):
        ax.bar(range(hist.shape[0]), hist[:, c], bottom=bottom, color=cmap(c), label=str(c) if hist.shape[1] <= 20 else None)
        bottom += hist[:, c]
    ax.set_xlabel("user")
    ax.set_ylabel("samples")
    ax.set_title("class histogram per user")
    if hist.shape[1] <= 20:
        ax.legend(fontsize=6, ncol=2, title="class", title_fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    return save(fig, path)


@drawn
def image_grid(originals: torch.Tensor, rows: list[tuple[str, torch.Tensor, list[str]]], path: Path) -> Path:
    """Original images on top, then one row per model with its per-image caption (PSNR/SSIM)."""
    n = len(originals)
    fig, axes = plt.subplots(1 + len(rows), n, figsize=(1.3 * n, 1.45 * (1 + len(rows))), squeeze=False)

    def show(ax, img, title):
        img = img.detach().cpu().clamp(0, 1).numpy()  # matplotlib wants arrays, not tensors
        if img.shape[0] == 1:
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img.transpose(1, 2, 0))
        ax.set_title(title, fontsize=6)
        ax.axis("off")

    for i in range(n):
        show(axes[0][i], originals[i], "original")
    for r, (label, images, captions) in enumerate(rows, start=1):
        for i in range(n):
            show(axes[r][i], images[i], f"{label}\n{captions[i]}")
    return save(fig, path)


@drawn
def snr_sweep(sweep: dict[str, dict[str, list[float]]], snrs: list[float], path: Path, dashed=(), dotted=()) -> Path:
    """PSNR and accuracy against SNR per model; the labels in ``dashed`` (a model tested on another
    channel than its own) are drawn dashed, those in ``dotted`` (the digital baseline) dotted."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for label, values in sweep.items():
        style = "--o" if label in dashed else ":s" if label in dotted else "-o"
        axes[0].plot(snrs, values["psnr_db"], style, ms=3, label=label)
        axes[1].plot(snrs, values["accuracy"], style, ms=3, label=label)
    for ax, title in zip(axes, ("PSNR (dB)", "classifier accuracy")):
        ax.set_xlabel("channel SNR (dB)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, path)
