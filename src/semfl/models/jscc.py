"""DeepJSCC (Bourtsoulatze et al. 2019): a conv encoder whose output is the channel input.

Encoder: conv5x5 a/s2, b/s2, b, semantic_dim (PReLU) gives S on the shared token grid; the last conv
gives 2 * symbols_per_token reals per position, power-normalised per image into X.
Decoder mirrors it with transposed convs and a sigmoid; its first layer's output is C.

At `cpu` (a, b) = (16, 32), the paper's first three layers. Two choices differ from the paper's
16/s2, 32/s2, 32, 32, c: the fourth layer is semantic_dim wide (64 at `cpu`), because every model
shares one token width, and the symbol layer has no PReLU (power normalisation follows it). With
the `cpu` default of 4 symbols per token, 32x32x3 images get k/n = 1/12, not the paper's 1/6
(``model.symbols_per_token = 8`` gives 1/6); 28x28 images get 196 symbols for 784 pixels.
"""
from __future__ import annotations

import torch
from torch import nn

from semfl.wireless.channel import power_normalize
from semfl.models.base import ImageSpec, SemanticModel, SemanticOutput
from semfl.models.registry import Shared, register_arch

JSCC_WIDTHS = {"tiny": (8, 8), "cpu": (16, 32), "paper": (64, 128)}


class DeepJSCC(SemanticModel):
    def __init__(self, spec: ImageSpec, channel: nn.Module, shared: Shared, widths: tuple[int, int]):
        super().__init__(channel)
        if shared.patch != 4:
            raise ValueError("DeepJSCC downsamples by 4: the shared patch must be 4")
        a, b = widths
        d, s = shared.semantic_dim, shared.symbols_per_token
        self.grid = (spec.height // 4, spec.width // 4)
        self.tokens = self.grid[0] * self.grid[1]
        self.semantic_dim = d
        self.symbols_per_token = s
        self.encoder = nn.Sequential(
            nn.Conv2d(spec.channels, a, 5, 2, 2), nn.PReLU(),
            nn.Conv2d(a, b, 5, 2, 2), nn.PReLU(),
            nn.Conv2d(b, b, 5, 1, 2), nn.PReLU(),
            nn.Conv2d(b, d, 5, 1, 2), nn.PReLU(),
        )
        self.to_symbols = nn.Conv2d(d, 2 * s, 5, 1, 2)
        self.from_symbols = nn.Sequential(nn.ConvTranspose2d(2 * s, d, 5, 1, 2), nn.PReLU())
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(d, b, 5, 1, 2), nn.PReLU(),
            nn.ConvTranspose2d(b, b, 5, 1, 2), nn.PReLU(),
            nn.ConvTranspose2d(b, a, 5, 2, 2, output_padding=1), nn.PReLU(),
            nn.ConvTranspose2d(a, spec.channels, 5, 2, 2, output_padding=1), nn.Sigmoid(),
        )

    # FineFed splits the model between a sender (encoder side) and a receiver (decoder side)
    sender_prefixes = ("encoder.", "to_symbols.")
    receiver_prefixes = ("from_symbols.", "decoder.")

    def _tokens(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap.flatten(2).transpose(1, 2)

    def _pairs(self, feat: torch.Tensor) -> torch.Tensor:
        """The encoder features' channel-input reals as pairs: (B, 2s, h, w) -> (B, T, s, 2), fp32."""
        z = self.to_symbols(feat)  # (B, 2s, h, w): symbol pairs per position
        return z.float().reshape(z.shape[0], self.symbols_per_token, 2, -1).permute(0, 3, 1, 2)

    def _symbols(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.encoder(images)
        z = self._pairs(feat)
        return feat, power_normalize(torch.view_as_complex(z.contiguous()).reshape(z.shape[0], -1))

    def symbol_map(self, Y: torch.Tensor) -> torch.Tensor:
        """Received symbols (B, n) complex -> the decoder's input map (B, 2s, h, w)."""
        y = torch.view_as_real(Y).reshape(Y.shape[0], self.tokens, self.symbols_per_token, 2)
        return y.permute(0, 2, 3, 1).reshape(Y.shape[0], 2 * self.symbols_per_token, *self.grid)

    def _received(self, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c_map = self.from_symbols(self.symbol_map(Y))
        return c_map, self.decoder(c_map)

    def transmit_symbols(self, images: torch.Tensor) -> torch.Tensor:
        """The sender's half: images -> X, (B, n) complex channel input of unit mean power."""
        return self._symbols(images)[1]

    def reconstruct(self, Y: torch.Tensor) -> torch.Tensor:
        """The receiver's half: (B, n) received complex symbols -> reconstructed images."""
        return self._received(Y)[1]

    def forward(self, images: torch.Tensor, snr_db) -> SemanticOutput:
        feat, X = self._symbols(images)
        c_map, recon = self._received(self.channel(X, snr_db))
        return SemanticOutput(S=self._tokens(feat), X=X, C=self._tokens(c_map), recon=recon)


@register_arch("jscc")
def build_jscc(scale: str, spec: ImageSpec, channel: nn.Module, shared: Shared) -> DeepJSCC:
    return DeepJSCC(spec, channel, shared, JSCC_WIDTHS[scale])
