"""Helpers shared by methods: building models for a run, the training SNR of a user."""
from __future__ import annotations

from torch import nn

from semfl.channel import make_channel
from semfl.methods.base import RunContext
from semfl.models import build_model


def build_semantic_model(run: RunContext, arch: str) -> nn.Module:
    cfg = run.cfg
    model = build_model(arch, cfg.scale, run.spec, make_channel(cfg.channel),
                        semantic_dim=cfg.model.semantic_dim, symbols_per_token=cfg.model.symbols_per_token)
    return model.to(run.device)


def train_snr(cfg, ctx) -> float:
    """The channel SNR a user trains at: its link SNR of the round, or a fixed value."""
    return ctx.snr_db if cfg.channel.train_snr == "link" else cfg.channel.snr_db


def reconstruction_rows(run: RunContext, models: dict[str, nn.Module], count: int, snr_db: float):
    """Test images and, per model, its reconstructions with 'PSNR / SSIM' captions."""
    import torch

    from semfl import metrics
    from semfl.training import snr_tensor

    images = run.test_x[:count]
    rows = []
    with torch.no_grad():
        for label, model in models.items():
            model.eval()
            recon = model(images, snr_tensor(snr_db, len(images), images.device)).recon
            p = metrics.psnr_per_image(recon, images)
            s = metrics.ssim_per_image(recon, images)
            rows.append((label, recon, [f"{a:.1f}dB/{b:.3f}" for a, b in zip(p.tolist(), s.tolist())]))
    return images, rows


def snr_sweep(run: RunContext, models: dict[str, nn.Module]) -> dict[str, dict[str, list[float]]]:
    from semfl.training import evaluate_semantic

    out = {}
    for label, model in models.items():
        rows = [evaluate_semantic(model, run.classifier, run.test_x, run.test_y, snr, run.cfg.eval.batch_size)
                for snr in run.cfg.eval.snr_sweep]
        out[label] = {k: [r[k] for r in rows] for k in ("psnr_db", "accuracy", "ssim", "loss")}
    return out


def finish_semantic(run: RunContext, models: dict[str, nn.Module], out_dir) -> dict:
    """Final artifacts every semantic method gives: a reconstruction grid and an SNR sweep."""
    import json
    from pathlib import Path

    from semfl.report import plots
    from semfl.runtime.checkpoint import atomic_text

    out_dir = Path(out_dir)
    if run.cfg.eval.grid_images:
        images, rows = reconstruction_rows(run, models, run.cfg.eval.grid_images, run.cfg.eval.snr_db)
        plots.image_grid(images, rows, out_dir / "figures" / "reconstructions.png")
    summary = {}
    if run.cfg.eval.snr_sweep:
        sweep = snr_sweep(run, models)
        atomic_text(out_dir / "snr_sweep.json", json.dumps({"snr_db": run.cfg.eval.snr_sweep, "models": sweep}, indent=1))
        plots.snr_sweep(sweep, run.cfg.eval.snr_sweep, out_dir / "figures" / "snr_sweep.png")
    return summary
