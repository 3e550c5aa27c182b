"""QSGD codecs (FedPAQ): "qsgd1", "qsgd2", ..., "qsgd256", one per number of levels s.

The payload tensors are outputs of semfl.wireless.compress.qsgd(x, s, generator): every entry is
sign * level * unit with integer level in [0, s] and unit ~ ||x|| / s exactly representable.
Per tensor of N entries: qsgd_bits(N, s) = 32 (unit / norm) + N (1 sign bit + ceil(log2(s+1))
level bits). The wire format keeps the unit (float), the signs and the integer levels, recovered
from the tensor alone: the unit is the greatest common divisor of the magnitudes (a multiple of
the quantiser's unit if all levels share a factor, which reconstructs the same values), so
decode(encode(x)) == x exactly.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

from semfl.wireless.codecs.base import Codec, register_codec
from semfl.wireless.compress import qsgd_bits

QSGD_LEVELS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def qsgd_levels(tensor: torch.Tensor, s: int, name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(unit, signed integer levels) with levels * unit == tensor exactly and |levels| <= s;
    ValueError if the tensor is not a QSGD output with at most s levels."""
    t = tensor.detach().cpu()
    mags = torch.unique(t.abs().reshape(-1).to(torch.float64))
    mags = mags[mags != 0].tolist()
    if not mags:
        return torch.zeros((), dtype=t.dtype), torch.zeros(t.shape, dtype=torch.int16)
    if len(mags) > s or not all(math.isfinite(m) for m in mags):
        raise ValueError(f"codec qsgd{s}: {name} has {len(mags)} distinct nonzero magnitudes "
                         f"(at most {s} allowed)")
    fracs = [Fraction(m) for m in mags]  # exact: floats are dyadic rationals
    denom = max(f.denominator for f in fracs)
    unit = Fraction(math.gcd(*(f.numerator * (denom // f.denominator) for f in fracs)), denom)
    unit_t = torch.tensor(float(unit), dtype=t.dtype)
    levels = torch.round(t.to(torch.float64) / float(unit)).to(torch.int16)
    if (Fraction(float(unit_t.item())) != unit or int(levels.abs().max()) > s
            or not torch.equal(levels.to(t.dtype) * unit_t, t)):
        raise ValueError(f"codec qsgd{s}: {name} is not on a QSGD grid with {s} levels")
    return unit_t, levels


class QSGDCodec(Codec):
    levels = 1
    name = "qsgd1"

    def tensor_bits(self, tensor: torch.Tensor) -> int:
        qsgd_levels(tensor, self.levels)
        return qsgd_bits(tensor.numel(), self.levels)

    def bits(self, tensors: dict[str, torch.Tensor]) -> int:
        total = 0
        for name, t in tensors.items():
            qsgd_levels(t, self.levels, name)
            total += qsgd_bits(t.numel(), self.levels)
        return total

    def compact(self, tensor: torch.Tensor):
        unit, levels = qsgd_levels(tensor, self.levels)
        return {"unit": unit, "negative": levels < 0, "levels": levels.abs().to(torch.int16)}

    def expand(self, stored) -> torch.Tensor:
        unit = stored["unit"]
        signed = torch.where(stored["negative"], -stored["levels"], stored["levels"])
        return signed.to(unit.dtype) * unit


def qsgd_codec_name(s: int) -> str:
    if s not in QSGD_LEVELS:
        raise ValueError(f"codec: no QSGD codec for s={s} (allowed: {QSGD_LEVELS})")
    return f"qsgd{s}"


for _s in QSGD_LEVELS:
    register_codec(type(f"QSGDCodec{_s}", (QSGDCodec,), {"levels": _s, "name": f"qsgd{_s}"}))
