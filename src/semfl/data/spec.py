"""The shape and label count of a dataset's images: what models are built for."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageSpec:
    channels: int
    height: int
    width: int
    num_classes: int
