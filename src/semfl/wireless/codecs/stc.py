"""STC codec (Sattler et al. 2019): tensors with values in {-mu, 0, +mu}.

Per tensor of N entries with k nonzeros: stc_bits(N, k) = ceil(k sign bits + expected
Golomb-coded position bits) + 32 bits for mu. The wire format (compact) keeps the positions,
the signs and mu, so decode(encode(x)) == x exactly.
"""
from __future__ import annotations

import math

import torch

from semfl.wireless.codecs.base import Codec, register_codec
from semfl.wireless.compress import stc_bits


def stc_magnitude(tensor: torch.Tensor, name: str = "tensor") -> torch.Tensor:
    """The common magnitude mu of the nonzeros (0 for an all-zero tensor); ValueError if the
    nonzeros do not share one magnitude (the tensor is not of STC form)."""
    mags = tensor.detach().reshape(-1).abs()
    mags = mags[mags != 0]
    if mags.numel() == 0:
        return torch.zeros((), dtype=tensor.dtype)
    mu = mags[0]
    if not bool(torch.all(mags == mu)):
        raise ValueError(f"codec stc: {name} is not of STC form (its nonzeros have more than one "
                         f"magnitude: {torch.unique(mags)[:4].tolist()}...)")
    return mu.cpu()


@register_codec
class STCCodec(Codec):
    name = "stc"

    def tensor_bits(self, tensor: torch.Tensor) -> int:
        stc_magnitude(tensor)
        return stc_bits(tensor.numel(), int(torch.count_nonzero(tensor)))

    def bits(self, tensors: dict[str, torch.Tensor]) -> int:
        total = 0
        for name, t in tensors.items():
            stc_magnitude(t, name)
            total += stc_bits(t.numel(), int(torch.count_nonzero(t)))
        return total

    def compact(self, tensor: torch.Tensor):
        flat = tensor.detach().cpu().reshape(-1)
        index = torch.nonzero(flat).reshape(-1)
        return {"shape": torch.tensor(tensor.shape, dtype=torch.int64), "index": index,
                "negative": flat[index] < 0, "mu": stc_magnitude(flat)}

    def expand(self, stored) -> torch.Tensor:
        shape = tuple(int(s) for s in stored["shape"])
        mu = stored["mu"]
        flat = torch.zeros(math.prod(shape), dtype=mu.dtype)
        flat[stored["index"]] = torch.where(stored["negative"], -mu, mu)
        return flat.reshape(shape)
