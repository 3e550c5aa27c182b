"""Sparse codec: nonzero values plus their positions, for any payload with zeros.

Per tensor of N entries with k nonzeros:
  32 bits for k, 32 bits per value, and positions as the cheaper of
  an index list (k * ceil(log2 N) bits) or a bitmap (N bits).
A tensor with no zeros falls back to dense when that is cheaper, flagged by one bit.
"""
from __future__ import annotations

import math

import torch

from semfl.wireless.codecs.base import Codec, register_codec
from semfl.wireless.codecs.dense import dtype_bits
from semfl.wireless.compress import position_bits

COUNT_BITS = 32
FORMAT_FLAG_BITS = 1


def sparse_tensor_bits(numel: int, nonzeros: int, value_bits: int = 32) -> int:
    sparse = COUNT_BITS + nonzeros * value_bits + position_bits(numel, nonzeros)
    return FORMAT_FLAG_BITS + min(sparse, numel * value_bits)


@register_codec
class SparseCodec(Codec):
    name = "sparse"

    def tensor_bits(self, tensor: torch.Tensor) -> int:
        nonzeros = int(torch.count_nonzero(tensor))
        return sparse_tensor_bits(tensor.numel(), nonzeros, dtype_bits(tensor.dtype))

    def compact(self, tensor: torch.Tensor):
        flat = tensor.detach().cpu().reshape(-1)
        index = torch.nonzero(flat).reshape(-1)
        return {"shape": torch.tensor(tensor.shape), "index": index, "values": flat[index]}

    def expand(self, stored) -> torch.Tensor:
        shape = tuple(int(s) for s in stored["shape"])
        flat = torch.zeros(math.prod(shape), dtype=stored["values"].dtype)
        flat[stored["index"]] = stored["values"]
        return flat.reshape(shape)
