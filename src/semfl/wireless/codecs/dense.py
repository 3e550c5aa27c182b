"""Dense codec: every entry at its dtype's width (float32 = 32 bits, int64 labels = 64 bits)."""
from __future__ import annotations

import torch

from semfl.wireless.codecs.base import Codec, register_codec


def dtype_bits(dtype: torch.dtype) -> int:
    if dtype == torch.bool:
        return 1
    return torch.empty((), dtype=dtype).element_size() * 8


@register_codec
class DenseCodec(Codec):
    name = "dense"

    def tensor_bits(self, tensor: torch.Tensor) -> int:
        return tensor.numel() * dtype_bits(tensor.dtype)
