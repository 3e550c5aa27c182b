"""Model families by name, with the presets shared across families at each scale.

Mentors and the student must agree on the token layout (patch) and semantic_dim, so those
live here, per scale, not in each family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from semfl.models.base import ImageSpec, SemanticModel


@dataclass(frozen=True)
class Shared:
    patch: int  # token grid = (H / patch, W / patch) for every family
    semantic_dim: int
    symbols_per_token: int
    codec_hidden: int


SHARED = {
    "tiny": Shared(patch=4, semantic_dim=16, symbols_per_token=2, codec_hidden=32),
    "cpu": Shared(patch=4, semantic_dim=64, symbols_per_token=4, codec_hidden=128),
    "paper": Shared(patch=4, semantic_dim=512, symbols_per_token=8, codec_hidden=1024),
}

Factory = Callable[[str, ImageSpec, nn.Module, Shared], SemanticModel]
_ARCHS: dict[str, Factory] = {}


def register_arch(name: str) -> Callable[[Factory], Factory]:
    def wrap(factory: Factory) -> Factory:
        _ARCHS[name] = factory
        return factory
    return wrap


def available_archs() -> list[str]:
    return sorted(_ARCHS)


def shared_for(scale: str, semantic_dim: int = 0, symbols_per_token: int = 0) -> Shared:
    base = SHARED[scale]
    return Shared(patch=base.patch, semantic_dim=semantic_dim or base.semantic_dim,
                  symbols_per_token=symbols_per_token or base.symbols_per_token, codec_hidden=base.codec_hidden)


def build_model(arch: str, scale: str, spec: ImageSpec, channel: nn.Module,
                semantic_dim: int = 0, symbols_per_token: int = 0) -> SemanticModel:
    if arch not in _ARCHS:
        raise ValueError(f"model.arch: unknown model {arch!r} (allowed: {', '.join(sorted(_ARCHS))})")
    if scale not in SHARED:
        raise ValueError(f"scale: unknown scale {scale!r} (allowed: {', '.join(SHARED)})")
    if spec.height % SHARED[scale].patch or spec.width % SHARED[scale].patch:
        raise ValueError(f"image size {spec.height}x{spec.width} is not a multiple of the patch {SHARED[scale].patch}")
    return _ARCHS[arch](scale, spec, channel, shared_for(scale, semantic_dim, symbols_per_token))
