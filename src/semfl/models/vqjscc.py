"""VQ-based digital DeepJSCC (FedSFR, after Huh et al.'s universal JSCC): DeepJSCC's convolutions with
a bounded encoder output, a fixed 2-D codebook equal to the M-QAM constellation (Sionna's ``qam``:
Gray-labelled, unit mean energy), nearest-codeword quantisation, the codeword sent as its QAM symbol,
nearest-point detection at the receiver and DeepJSCC's decoder.

Encoder output: z = (1 - margin) * max|codeword coordinate| * tanh(.), pairs of reals = 2-D feature
vectors (FedSFR's last encoder layer). Both hard decisions (quantiser, detector) pass gradients
straight through. The codeword-usage regulariser of FedSFR eq 3, usage_weight * KL(p || uniform)
with p the batch mean of softmax(-soft_sigma * |z - c_j|^2) over the M codewords (DeepJSCC-Q's soft
assignment), comes back as ``SemanticOutput.aux`` and is added to the training loss.
"""
from __future__ import annotations


import torch

from semfl.models.base import SemanticOutput
from semfl.models.jscc import JSCC_WIDTHS, DeepJSCC
from semfl.models.registry import register_arch


def qam_codebook(bits_per_symbol: int) -> torch.Tensor:
    """(M, 2) real coordinates of Sionna's unit-energy M-QAM, M = 2**bits_per_symbol; row n has label n."""
    from semfl.wireless.channel import sionna_phy

    sionna_phy()  # the first Sionna import goes through it: it keeps torch's generator where it was
    from sionna.phy.mapping import qam

    points = torch.from_numpy(qam(bits_per_symbol))
    return torch.view_as_real(points).float().contiguous()


def nearest_codeword(v: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codeword of each 2-D vector v (..., 2)."""
    flat = v.detach().reshape(-1, 2)
    return torch.cdist(flat, codebook.to(flat.dtype)).argmin(1).reshape(v.shape[:-1])


def largest_margin(bits_per_symbol: int) -> float:
    """The margin at which the encoder's bound (1 - margin) max|c| reaches the decision boundary of
    the square M-QAM's outer codewords, 1 / (sqrt(M) - 1): a margin at or above it leaves the outer
    ring (4 sqrt(M) - 4 codewords) out of the encoder's reach."""
    return 1 / (2 ** (bits_per_symbol / 2) - 1)


class VQJSCC(DeepJSCC):
    margin = 0.05  # below largest_margin of 16-, 64- and 256-QAM (1/3, 1/7, 1/15)
    usage_weight = 0.01  # beta of FedSFR eq 3
    soft_sigma = 50.0

    def __init__(self, spec, channel, shared, widths, bits_per_symbol: int = 8):
        super().__init__(spec, channel, shared, widths)
        self.register_buffer("codebook", torch.empty(0, 2), persistent=False)  # filled by configure
        self.configure(bits_per_symbol)

    def configure(self, bits_per_symbol: int, margin: float | None = None, usage_weight: float | None = None) -> None:
        """Codebook order (2**bits_per_symbol-QAM), encoder margin and the usage-loss weight."""
        book = qam_codebook(bits_per_symbol)  # on the CPU, even when the model is built on the meta device
        self.bits_per_symbol = bits_per_symbol
        self.margin = self.margin if margin is None else margin
        if not 0 <= self.margin < largest_margin(bits_per_symbol):
            raise ValueError(f"margin {self.margin}: {2 ** bits_per_symbol}-QAM needs 0 <= margin < "
                             f"{largest_margin(bits_per_symbol):.4f}, or its outer codewords can never be chosen")
        self.usage_weight = self.usage_weight if usage_weight is None else usage_weight
        self.bound = (1 - self.margin) * float(book.abs().max())
        self.codebook = book.to(self.codebook.device)

    @property
    def qam_grid(self) -> torch.Tensor:
        """The sorted coordinates of the square QAM along one axis (FedSFR's update quantiser grid)."""
        return self.codebook[:, 0].unique().sort().values

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.encoder(images)
        z = self._pairs(feat)
        return feat, self.bound * torch.tanh(z.reshape(z.shape[0], -1, 2))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's bounded 2-D feature vectors z, (B, n, 2)."""
        return self._encode(images)[1]

    def codewords_of(self, indices: torch.Tensor) -> torch.Tensor:
        """Codeword indices (...) -> their codewords (..., 2), on the model's device."""
        return self.codebook[indices.to(self.codebook.device).long()]

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """z -> its nearest codewords, straight-through."""
        return z + (self.codewords_of(nearest_codeword(z, self.codebook)) - z).detach()

    def usage_kl(self, z: torch.Tensor) -> torch.Tensor:
        d = (z.reshape(-1, 1, 2) - self.codebook).pow(2).sum(-1)
        p = torch.softmax(-self.soft_sigma * d, dim=1).mean(0)
        return (p * (p.clamp_min(1e-12) * len(self.codebook)).log()).sum()

    def transmit_symbols(self, images: torch.Tensor) -> torch.Tensor:
        return torch.view_as_complex(self.quantize(self.features(images)).contiguous())

    def decode_codewords(self, c: torch.Tensor) -> torch.Tensor:
        """Detected codewords (B, n, 2) -> reconstructed images."""
        return self._received(torch.view_as_complex(c.contiguous()))[1]

    def reconstruct(self, Y: torch.Tensor) -> torch.Tensor:
        return self.decode_codewords(self.quantize(torch.view_as_real(Y)))  # nearest-point detection

    def forward(self, images: torch.Tensor, snr_db) -> SemanticOutput:
        feat, z = self._encode(images)
        X = torch.view_as_complex(self.quantize(z).contiguous())
        c_map, recon = self._received(torch.view_as_complex(self.quantize(torch.view_as_real(self.channel(X, snr_db))).contiguous()))
        aux = self.usage_weight * self.usage_kl(z) if self.training and self.usage_weight else None
        return SemanticOutput(S=self._tokens(feat), X=X, C=self._tokens(c_map), recon=recon, aux=aux)


@register_arch("vq-jscc")
def build_vqjscc(scale: str, spec, channel, shared) -> VQJSCC:
    return VQJSCC(spec, channel, shared, JSCC_WIDTHS[scale])



