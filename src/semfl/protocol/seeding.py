"""Every random draw of a run is a pure function of (seed, round, user, purpose).

That makes runs deterministic and lets a resumed run redo a round bit-for-bit without
saving generator states.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from semfl import rng
from semfl.wireless.channel import seed_channels


def derive_seed(*parts: int | str) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF


def generator(*parts: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


def numpy_rng(*parts: int | str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*parts))


def enter(*parts: int | str) -> None:
    """Seed the global torch generator and Sionna's channel generators for one unit of work."""
    seed = derive_seed(*parts)
    # Sionna's seeding also reseeds torch's global generator, so seed it first with its own stream
    seed_channels(derive_seed(seed, "channel") % (2 ** 31))
    rng.manual_seed(seed)
