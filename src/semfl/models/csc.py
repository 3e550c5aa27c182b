"""CSC student (PSFL): ResNet-18-style semantic encoder, DNN channel codec, 3 transposed-conv decoder.

The encoder downsamples by the shared patch size (4), so its feature map is the same token grid
as the ViT mentors'; a 1x1 conv projects to the shared semantic_dim (eq 23 needs equal shapes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from semfl.models.base import ImageSpec, SemanticModel, SemanticOutput
from semfl.models.blocks import BasicBlock, group_norm, resnet_stages
from semfl.models.channel_codec import ChannelCodec
from semfl.models.registry import Shared, register_arch


@dataclass(frozen=True)
class CSCPreset:
    width: int  # channels of the first stage; stages use width * (1, 2, 4, 8)
    depths: tuple[int, int, int, int]
    decoder_widths: tuple[int, int]


CSC_PRESETS = {
    "tiny": CSCPreset(width=4, depths=(1, 1, 1, 1), decoder_widths=(16, 8)),
    "cpu": CSCPreset(width=8, depths=(2, 2, 2, 2), decoder_widths=(48, 24)),
    # ResNet-18 depths at twice ResNet-18's width: 54.7 M parameters with the channel codec (Table I)
    "paper": CSCPreset(width=128, depths=(2, 2, 2, 2), decoder_widths=(640, 320)),
}


class CSC(SemanticModel):
    def __init__(self, spec: ImageSpec, channel: nn.Module, shared: Shared, preset: CSCPreset):
        super().__init__(channel)
        self.spec = spec
        self.grid = (spec.height // shared.patch, spec.width // shared.patch)
        self.tokens = self.grid[0] * self.grid[1]
        self.semantic_dim = shared.semantic_dim
        w = preset.width
        self.stem = nn.Sequential(nn.Conv2d(spec.channels, w, 3, 1, 1, bias=False), group_norm(w), nn.ReLU())
        # strides 1, 2, 2, 1: total downsampling 4 == the shared patch size
        self.stages, cout = resnet_stages(BasicBlock, w, [w, 2 * w, 4 * w, 8 * w], list(preset.depths),
                                          [1, 2, 2, 1], group_norm)
        self.project = nn.Conv2d(cout, shared.semantic_dim, 1)
        self.codec = ChannelCodec(shared.semantic_dim, shared.symbols_per_token, shared.codec_hidden)
        d1, d2 = preset.decoder_widths
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(shared.semantic_dim, d1, 4, 2, 1), nn.PReLU(),
            nn.ConvTranspose2d(d1, d2, 4, 2, 1), nn.PReLU(),
            nn.ConvTranspose2d(d2, spec.channels, 3, 1, 1), nn.Sigmoid(),
        )

    # FineFed splits the model between a sender (encoder side) and a receiver (decoder side)
    sender_prefixes = ("stem.", "stages.", "project.", "codec.encoder.")
    receiver_prefixes = ("codec.decoder.", "decoder.")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        feat = self.project(self.stages(self.stem(images)))
        return feat.flatten(2).transpose(1, 2)  # (B, T, D)

    def decode(self, C: torch.Tensor) -> torch.Tensor:
        grid = C.transpose(1, 2).reshape(C.shape[0], self.semantic_dim, *self.grid)
        return self.decoder(grid)

    def transmit_symbols(self, images: torch.Tensor) -> torch.Tensor:
        """The sender's half: images -> X, (B, n) complex channel input of unit mean power."""
        return self.codec.encode(self.encode(images))

    def reconstruct(self, Y: torch.Tensor) -> torch.Tensor:
        """The receiver's half: (B, n) received complex symbols -> reconstructed images."""
        return self.decode(self.codec.decode(Y, self.tokens))

    def forward(self, images: torch.Tensor, snr_db) -> SemanticOutput:
        S = self.encode(images)
        X = self.codec.encode(S)
        C = self.codec.decode(self.channel(X, snr_db), self.tokens)
        return SemanticOutput(S=S, X=X, C=C, recon=self.decode(C))


@register_arch("csc")
def build_csc(scale: str, spec: ImageSpec, channel: nn.Module, shared: Shared) -> CSC:
    return CSC(spec, channel, shared, CSC_PRESETS[scale])
