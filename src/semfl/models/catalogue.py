"""Parameter counts of every model preset; `paper` presets are built on the meta device."""
from __future__ import annotations

import torch

from semfl.wireless.channel import Channel
from semfl.models.base import ImageSpec
from semfl.models.classifier import CLASSIFIER_PRESETS, ResNetClassifier
from semfl.models.registry import available_archs, build_model

SPECS = {"fashion-mnist": ImageSpec(1, 28, 28, 10), "mnist": ImageSpec(1, 28, 28, 10),
         "cifar10": ImageSpec(3, 32, 32, 10), "cifar100": ImageSpec(3, 32, 32, 100)}
ROLES = {"csc": "student", "jscc": "codec", "vq-jscc": "digital codec", "gsc-m": "mentor", "gsc-l": "mentor", "gsc-h": "mentor"}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_table(scale: str = "all", dataset: str = "fashion-mnist") -> list[dict]:
    if dataset not in SPECS:
        raise ValueError(f"dataset: unknown dataset {dataset!r} (allowed: {', '.join(SPECS)})")
    spec = SPECS[dataset]
    scales = ["tiny", "cpu", "paper"] if scale == "all" else [scale]
    rows = []
    for sc in scales:
        # meta tensors have shapes but no storage: paper-size models cost no memory here
        with torch.device("meta"):
            for arch in available_archs():
                model = build_model(arch, sc, spec, Channel("awgn"))
                rows.append({"scale": sc, "arch": arch, "role": ROLES.get(arch, "model"), "parameters": count(model),
                             "image": f"{spec.channels}x{spec.height}x{spec.width}"})
            preset = CLASSIFIER_PRESETS[sc]
            rows.append({"scale": sc, "arch": f"resnet{preset.depth}", "role": "classifier",
                         "parameters": count(ResNetClassifier(spec, preset.depth, preset.width)),
                         "image": f"{spec.channels}x{spec.height}x{spec.width}"})
    return rows
