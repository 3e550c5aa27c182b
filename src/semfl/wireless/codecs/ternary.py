"""Ternary codec (FTTQ / T-FedAvg, Xu et al. 2020): tensors with values in {-wp, 0, +wp}.

Per tensor of N entries: 2 bits per entry + 32 bits for wp. The wire format keeps one int8 code
(-1, 0, +1) per entry and wp, so decode(encode(x)) == x exactly.
"""
from __future__ import annotations

import torch

from semfl.wireless.codecs.base import Codec, register_codec

CODE_BITS = 2
SCALE_BITS = 32


def ternary_scale(tensor: torch.Tensor, name: str = "tensor") -> torch.Tensor:
    """wp = the common magnitude of the nonzeros (0 for an all-zero tensor); ValueError if the
    tensor has more than 3 distinct values or they are not of the form {-wp, 0, +wp}."""
    flat = tensor.detach().reshape(-1)
    mags = flat.abs()
    mags = mags[mags != 0]
    if mags.numel() == 0:
        return torch.zeros((), dtype=tensor.dtype)
    wp = mags[0]
    if not bool(torch.all(mags == wp)):
        values = torch.unique(flat)
        raise ValueError(f"codec ternary: {name} is not ternary ({values.numel()} distinct values, "
                         f"expected at most 3 of the form {{-wp, 0, +wp}})")
    return wp.cpu()


@register_codec
class TernaryCodec(Codec):
    name = "ternary"

    def tensor_bits(self, tensor: torch.Tensor) -> int:
        ternary_scale(tensor)
        return CODE_BITS * tensor.numel() + SCALE_BITS

    def bits(self, tensors: dict[str, torch.Tensor]) -> int:
        total = 0
        for name, t in tensors.items():
            ternary_scale(t, name)
            total += CODE_BITS * t.numel() + SCALE_BITS
        return total

    def compact(self, tensor: torch.Tensor):
        t = tensor.detach().cpu()
        return {"codes": torch.sign(t).to(torch.int8), "wp": ternary_scale(t)}

    def expand(self, stored) -> torch.Tensor:
        codes, wp = stored["codes"], stored["wp"]
        zero = torch.zeros((), dtype=wp.dtype)
        return torch.where(codes > 0, wp, torch.where(codes < 0, -wp, zero))
