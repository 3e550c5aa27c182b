"""FedSFR's codecs: "svq4" / "svq6" / "svq8" for top-k + stochastic VQ updates on a 2**b-QAM grid, and
"index4" / "index6" / "index8" for codeword indices (b bits each).

svq<b>: per tensor of N entries with k nonzeros, compress.svq_bits(N, k, b) = 32 (scale) + 32 (k) +
positions + ceil(k / 2) * b (one codeword index per pair of values). Stochastic VQ never outputs 0 for
a kept value, so the nonzeros are the kept entries. The wire format stores positions and values.
"""
from __future__ import annotations

import torch

from semfl.wireless.codecs.base import Codec, register_codec
from semfl.wireless.codecs.sparse import SparseCodec
from semfl.wireless.compress import svq_bits

QAM_BITS = (4, 6, 8)


class SVQCodec(SparseCodec):
    bits_per_symbol = 8
    name = "svq8"

    def tensor_bits(self, tensor: torch.Tensor) -> int:
        return svq_bits(tensor.numel(), int(torch.count_nonzero(tensor)), self.bits_per_symbol)


class IndexCodec(Codec):
    bits_per_symbol = 8
    name = "index8"

    def tensor_bits(self, tensor: torch.Tensor) -> int:
        if tensor.is_floating_point() or (tensor.numel() and int(tensor.max()) >= 2 ** self.bits_per_symbol):
            raise ValueError(f"codec {self.name}: expects integer codeword indices below {2 ** self.bits_per_symbol}")
        return tensor.numel() * self.bits_per_symbol


for _b in QAM_BITS:
    register_codec(type(f"SVQCodec{_b}", (SVQCodec,), {"bits_per_symbol": _b, "name": f"svq{_b}"}))
    register_codec(type(f"IndexCodec{_b}", (IndexCodec,), {"bits_per_symbol": _b, "name": f"index{_b}"}))
