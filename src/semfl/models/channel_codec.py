"""The DNN channel codec shared by the CSC student and the GSC mentors.

Per token: semantic_dim -> hidden -> 2 * symbols_per_token reals = symbols_per_token complex
channel uses. Power is normalised per image, so the SNR of the channel is Es/N0.
"""
from __future__ import annotations

import torch
from torch import nn

from semfl.wireless.channel import power_normalize


class ChannelCodec(nn.Module):
    def __init__(self, semantic_dim: int, symbols_per_token: int, hidden: int):
        super().__init__()
        self.symbols_per_token = symbols_per_token
        self.encoder = nn.Sequential(nn.Linear(semantic_dim, hidden), nn.PReLU(), nn.Linear(hidden, 2 * symbols_per_token))
        self.decoder = nn.Sequential(nn.Linear(2 * symbols_per_token, hidden), nn.PReLU(), nn.Linear(hidden, semantic_dim))

    def encode(self, S: torch.Tensor) -> torch.Tensor:
        """(B, T, D) features -> (B, T * symbols_per_token) complex symbols of unit mean power."""
        z = self.encoder(S).reshape(S.shape[0], -1, 2).float()  # fp32 under bf16 autocast too
        return power_normalize(torch.view_as_complex(z.contiguous()))

    def decode(self, Y: torch.Tensor, tokens: int) -> torch.Tensor:
        """(B, n) received complex symbols -> (B, T, D) channel-decoder output C."""
        z = torch.view_as_real(Y).reshape(Y.shape[0], tokens, 2 * self.symbols_per_token)
        return self.decoder(z)
