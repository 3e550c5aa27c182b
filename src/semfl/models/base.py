"""The semantic-model interface every model family implements.

encoder -> S (semantic features) -> channel encoder -> X (complex symbols, unit power per image)
-> channel -> channel decoder -> C -> decoder -> reconstruction.
PSFL's eq. 23 compares S and C of a mentor and a student, so both are exposed with a
shared layout: S and C are (batch, tokens, semantic_dim), tokens = (H / patch) * (W / patch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from semfl.data.spec import ImageSpec  # noqa: F401  (models describe their input with it)


@dataclass
class SemanticOutput:
    S: torch.Tensor  # semantic features (B, tokens, semantic_dim)
    X: torch.Tensor  # channel input, complex (B, n_symbols), unit average power per image
    C: torch.Tensor  # channel-decoder output (B, tokens, semantic_dim)
    recon: torch.Tensor  # reconstruction in [0, 1], same shape as the input image
    aux: torch.Tensor | None = None  # a model's own training-loss term (VQ codeword usage), added by local_train


class SemanticModel(nn.Module):
    """Base class: subclasses implement encode/decode around the shared channel step."""

    semantic_dim: int
    tokens: int

    def __init__(self, channel: nn.Module):
        super().__init__()
        self.channel = channel

    def forward(self, images: torch.Tensor, snr_db: torch.Tensor | float) -> SemanticOutput:
        raise NotImplementedError
