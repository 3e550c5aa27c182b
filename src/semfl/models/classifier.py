"""The frozen task classifier: a ResNet trained once per dataset on clean images and cached.

It gives the task loss (CE on reconstructions) and the "accuracy" of a semantic model, which is
this classifier's accuracy on the model's reconstructions (PSFL Section V).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from semfl.models.base import ImageSpec
from semfl.models.blocks import BasicBlock, Bottleneck, resnet_stages
from semfl import rng
from semfl.files import atomic_write, cache_lock

DEPTHS = {
    8: (BasicBlock, (1, 1, 1)),  # CIFAR-style 3-stage ResNet
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


@dataclass(frozen=True)
class ClassifierPreset:
    depth: int
    width: int
    epochs: int


CLASSIFIER_PRESETS = {
    "tiny": ClassifierPreset(depth=8, width=8, epochs=1),
    "cpu": ClassifierPreset(depth=8, width=16, epochs=2),
    "paper": ClassifierPreset(depth=101, width=64, epochs=30),  # the paper's ResNet-101
}


class ResNetClassifier(nn.Module):
    def __init__(self, spec: ImageSpec, depth: int, width: int):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"classifier.depth: must be one of {sorted(DEPTHS)}, got {depth}")
        block, depths = DEPTHS[depth]
        widths = [width * 2 ** i for i in range(len(depths))]
        strides = [1] + [2] * (len(depths) - 1)
        self.stem = nn.Sequential(nn.Conv2d(spec.channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stages, cout = resnet_stages(block, width, widths, list(depths), strides, nn.BatchNorm2d)
        self.head = nn.Linear(cout, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.stages(self.stem(x))
        return self.head(feat.mean(dim=(2, 3)))


def _fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(str(tuple(images.shape)).encode())
    digest.update((images[:: max(1, len(images) // 512)] * 255).round().to(torch.uint8).numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    return digest.hexdigest()[:12]


def default_cache_dir(data_root: Path | None) -> Path:
    # system dataset folders (Debian's /usr/share/datasets) are not ours to write into
    if data_root is not None and os.access(data_root, os.W_OK) and not str(data_root).startswith("/usr/"):
        return data_root / "semfl-cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "semfl"


def run_cache_dir(cfg) -> Path:
    """Where a run caches what it trains once (classifier, foundation mentors)."""
    from semfl.data import resolve_root

    if cfg.classifier.cache_dir:
        return Path(cfg.classifier.cache_dir)
    return default_cache_dir(resolve_root(cfg.dataset, cfg.data.root))


def train_classifier(model: ResNetClassifier, images: torch.Tensor, labels: torch.Tensor, epochs: int,
                     batch_size: int, lr: float, seed: int, progress=None) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(images), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
            if progress is not None:
                progress(len(idx))
        losses.append(total / len(images))
    model.eval()
    return losses


def frozen_classifier(spec: ImageSpec, dataset: str, train_x: torch.Tensor, train_y: torch.Tensor, *,
                      scale: str, depth: int = 0, epochs: int = 0, lr: float = 1e-3, batch_size: int = 128,
                      cache_dir: Path, seed: int = 0, progress=None) -> tuple[ResNetClassifier, Path, bool]:
    """Load the cached classifier for this dataset and preset, or train and cache it.

    Returns (model in eval mode with requires_grad off, cache path, whether it was trained now).
    """
    preset = CLASSIFIER_PRESETS[scale]
    depth = depth or preset.depth
    epochs = epochs or preset.epochs
    width = preset.width
    # every training hyper-parameter is in the key: a changed lr / batch size must not reuse a stale model
    key = (f"classifier-{dataset}-r{depth}w{width}-e{epochs}-lr{lr:g}-b{batch_size}-s{seed}-"
           f"{_fingerprint(train_x, train_y)}.pt")
    path = Path(cache_dir) / key
    rng.manual_seed(seed)
    model = ResNetClassifier(spec, depth, width)
    trained = False
    with cache_lock(path):
        if path.is_file():
            try:
                model.load_state_dict(torch.load(path, weights_only=True))
            except Exception as exc:  # a corrupt cache is rebuilt, not trusted
                raise RuntimeError(f"classifier cache {path} is unreadable ({exc}); delete it to retrain") from None
        else:
            train_classifier(model, train_x, train_y, epochs, batch_size, lr, seed, progress)
            atomic_write(path, lambda handle: torch.save(model.state_dict(), handle))
            trained = True
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, path, trained
