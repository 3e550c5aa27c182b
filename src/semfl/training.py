"""Local training and evaluation of semantic models, shared by every method."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from semfl import metrics
from semfl.config import TrainConfig


def make_optimizer(params, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def clip_gradients(model: nn.Module, max_norm: float) -> None:
    """Clip the global gradient norm (0 = off): the task loss through a frozen classifier can spike."""
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def autocast(precision: str, device: torch.device | str):
    """The forward/loss context of ``train.precision``: bf16 autocast, or nothing for fp32.

    Only the model's convolutions and matmuls run in bf16; autocast keeps MSE and cross-entropy in
    fp32, PLD's KL casts its logits to fp32, and the codec hands the channel fp32 symbols (complex
    bf16 does not exist).
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"train.precision must be 'fp32' or 'bf16', got {precision!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"train.precision = 'bf16': the GPU {torch.cuda.get_device_name(device)} has no bf16 support")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def reconstruction_loss(recon: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                        classifier: nn.Module, task_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE(m, m_hat) + task_weight * CE(y, classifier(m_hat))."""
    mse = F.mse_loss(recon, images)
    if task_weight == 0:
        return mse, {"mse": float(mse.detach())}
    ce = F.cross_entropy(classifier(recon), labels)
    return mse + task_weight * ce, {"mse": float(mse.detach()), "ce": float(ce.detach())}


def snr_tensor(snr_db: float, batch: int, device: torch.device) -> torch.Tensor:
    return torch.full((batch,), float(snr_db), device=device)


def local_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                snr_db: float | torch.Tensor, classifier: nn.Module, generator: torch.Generator,
                masks: dict[str, torch.Tensor] | None = None) -> float:
    """Local epochs of SGD on (x, y) at the given channel SNR; returns the mean training loss.

    ``snr_db`` is one SNR for every sample, or a tensor with one SNR per sample of ``x`` (pooled
    data, each sample at its owner's SNR).

    With `masks` (parameter name -> 0/1 tensor), masked weights are held at zero after every
    step, so a pruned model stays pruned and its update is sparse with the same support.
    """
    model.train()
    optimiser = make_optimizer(model.parameters(), cfg)
    params = dict(model.named_parameters())
    total, count = 0.0, 0
    for _ in range(cfg.local_epochs):
        for idx in batches(len(x), cfg.batch_size, generator):
            images, labels = x[idx], y[idx]
            with autocast(cfg.precision, images.device):
                snr = snr_db[idx] if torch.is_tensor(snr_db) else snr_tensor(snr_db, len(idx), images.device)
                out = model(images, snr)
                loss, _ = reconstruction_loss(out.recon, images, labels, classifier, cfg.task_weight)
                if out.aux is not None:
                    loss = loss + out.aux
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(model, cfg.grad_clip)
            optimiser.step()
            if masks:
                apply_masks(params, masks)
            total += float(loss.detach()) * len(idx)
            count += len(idx)
    return total / max(count, 1)


@torch.no_grad()
def apply_masks(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        params[name].mul_(mask)


@torch.no_grad()
def evaluate_semantic(model: nn.Module, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      snr_db: float, batch_size: int) -> dict[str, float]:
    """Test-set quality of a semantic model at one channel SNR.

    loss = MSE + CE of the frozen classifier on the reconstructions (PSFL eq 20's task loss),
    accuracy = that classifier's accuracy on the reconstructions.
    """
    model.eval()
    sums = {"mse": 0.0, "ce": 0.0, "correct": 0.0, "psnr_db": 0.0, "ssim": 0.0}
    for start in range(0, len(x), batch_size):
        images, labels = x[start:start + batch_size], y[start:start + batch_size]
        recon = model(images, snr_tensor(snr_db, len(images), images.device)).recon
        logits = classifier(recon)
        n = len(images)
        sums["mse"] += float(F.mse_loss(recon, images, reduction="sum")) / images[0].numel()
        sums["ce"] += float(F.cross_entropy(logits, labels, reduction="sum"))
        sums["correct"] += float((logits.argmax(1) == labels).sum())
        sums["psnr_db"] += float(metrics.psnr_per_image(recon, images).clamp(max=100).sum())
        sums["ssim"] += float(metrics.ssim(recon, images)) * n
    n = len(x)
    out = {k: v / n for k, v in sums.items()}
    out["accuracy"] = out.pop("correct")
    out["loss"] = out["mse"] + out["ce"]
    return out


class RunningAverage:
    """Weighted running mean of state dicts: one accumulator, not K held updates."""

    def __init__(self):
        self.sum: dict[str, torch.Tensor] | None = None
        self.weight = 0.0

    def add(self, tensors: dict[str, torch.Tensor], weight: float) -> None:
        if self.sum is None:
            self.sum = {k: v.detach().to(torch.float64) * weight for k, v in tensors.items()}
        else:
            for k, v in tensors.items():
                self.sum[k].add_(v.detach().to(torch.float64), alpha=weight)
        self.weight += weight

    def result(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.sum is None:
            raise RuntimeError("no replies to aggregate")
        return {k: (self.sum[k] / self.weight).to(like[k].dtype) for k in self.sum}


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (what crosses the link); fixed buffers stay put."""
    return {k: p.detach().clone() for k, p in model.named_parameters()}


@torch.no_grad()
def load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy weights into the model's parameters in place (one working model per role)."""
    params = dict(model.named_parameters())
    for name, value in weights.items():
        params[name].copy_(value)
