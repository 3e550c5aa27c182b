"""Split semantic models (FedCL, Wang et al.): user encoders, the channel between them and the base
station's classifier head ("semantic decoder"), and the semantic centroid generator (SCG).

* Encoders are DCGAN-discriminator-like conv stacks (4x4 stride-2 convs, LeakyReLU 0.2, BatchNorm
  after every conv but the first) ending in a linear layer to ``FEATURE_DIM`` = 64 reals, the
  paper's output dimension. Presets differ in width and depth so users can be heterogeneous.
* :func:`transmit`: the 64 reals become 32 complex symbols, power-normalised (unit mean power per
  symbol), sent through the differentiable channel and turned back into 64 reals -- the received
  noisy feature ``f_hat`` (eq 2). Differentiable w.r.t. the encoder output.
* :class:`ClassifierHead`: two FC layers, 10 outputs (eq 3).
* :class:`SCG`: two FC layers with a ReLU between them and 64 outputs (the paper). Its input: the
  paper "randomly initialise[s] each global semantic centroid vector" and then trains the SCG to map
  them to better centroids, so by default the input of class ``c`` is a fixed random vector
  ``z_c ~ N(0, I_64)`` drawn once per run (``scg_input="random"``); ``"learned"`` makes ``z_c``
  trainable (a class embedding) and ``"onehot"`` feeds the one-hot class vector.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from semfl.wireless.channel import power_normalize

FEATURE_DIM = 64  # paper: encoder output dimension 64 -> 32 complex symbols


@dataclass(frozen=True)
class EncoderPreset:
    widths: tuple[int, ...]  # channels of the stride-2 convs
    extra: int  # extra 3x3 stride-1 convs after each stride-2 conv (depth)


ENCODERS = {
    "dcgan-s": EncoderPreset(widths=(16, 32), extra=0),
    "dcgan-m": EncoderPreset(widths=(32, 64, 128), extra=0),
    "dcgan-l": EncoderPreset(widths=(32, 64, 128), extra=1),
}
WIDTH_SCALE = {"tiny": 0.25, "cpu": 1.0, "paper": 2.0}


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True)


class SplitEncoder(nn.Module):
    """DCGAN-like conv encoder: image (B, C, H, W) -> feature (B, 64)."""

    def __init__(self, preset: str, channels: int, height: int, width: int, scale: str = "cpu",
                 out_dim: int = FEATURE_DIM):
        super().__init__()
        if preset not in ENCODERS:
            raise ValueError(f"unknown encoder preset {preset!r} (allowed: {', '.join(ENCODERS)})")
        p = ENCODERS[preset]
        layers: list[nn.Module] = []
        c_in = channels
        for i, w in enumerate(p.widths):
            w = max(4, int(round(w * WIDTH_SCALE[scale])))
            layers += [nn.Conv2d(c_in, w, 4, 2, 1, bias=i == 0)]
            if i > 0:
                layers.append(nn.BatchNorm2d(w))
            layers.append(_act())
            for _ in range(p.extra):
                layers += [nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), _act()]
            c_in = w
            height, width = height // 2, width // 2
        self.trunk = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in * height * width, out_dim)
        self.preset = preset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(x).flatten(1))


def transmit(f: torch.Tensor, channel: nn.Module, snr_db: float | torch.Tensor) -> torch.Tensor:
    """Encoder output (B, 2n) -> n power-normalised complex symbols -> channel -> received (B, 2n)."""
    b, d = f.shape
    s = power_normalize(torch.view_as_complex(f.float().reshape(b, d // 2, 2).contiguous()))
    snr = snr_db if isinstance(snr_db, torch.Tensor) else torch.full((b,), float(snr_db), device=f.device)
    return torch.view_as_real(channel(s, snr)).reshape(b, d)


def symbols(f: torch.Tensor) -> torch.Tensor:
    """The transmitted (noiseless) power-normalised symbols of ``f`` as reals (B, 2n)."""
    b, d = f.shape
    s = power_normalize(torch.view_as_complex(f.float().reshape(b, d // 2, 2).contiguous()))
    return torch.view_as_real(s).reshape(b, d)


class ClassifierHead(nn.Module):
    """The base station's semantic decoder: FC -> ReLU -> FC with ``classes`` outputs."""

    def __init__(self, classes: int = 10, in_dim: int = FEATURE_DIM, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, classes))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


class SCG(nn.Module):
    """Semantic centroid generator: class inputs (C, in) -> global centroids F (C, 64)."""

    def __init__(self, classes: int, input_kind: str = "random", hidden: int = 128, out_dim: int = FEATURE_DIM,
                 generator: torch.Generator | None = None):
        super().__init__()
        if input_kind == "onehot":
            z = torch.eye(classes)
        elif input_kind in ("random", "learned"):
            z = torch.randn(classes, out_dim, generator=generator)
        else:
            raise ValueError(f"unknown SCG input {input_kind!r} (allowed: random, learned, onehot)")
        if input_kind == "learned":
            self.z = nn.Parameter(z)
        else:
            self.register_buffer("z", z)
        self.net = nn.Sequential(nn.Linear(z.shape[1], hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self) -> torch.Tensor:
        return self.net(self.z)


def scg_loss(local_centroids: torch.Tensor, present: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Eqs 8-9: sum over classes c and users k holding c of
    ``log sum_{n != c} exp(fbar_k^c . F^n) - fbar_k^c . F^c``.

    local_centroids (K, C, d) (eq 7), present (K, C) bool (D_{k,c} > 0), centroids F (C, d).
    """
    logits = torch.einsum("kcd,nd->kcn", local_centroids, centroids)  # fbar_k^c . F^n
    classes = centroids.shape[0]
    eye = torch.eye(classes, dtype=torch.bool, device=logits.device)
    negatives = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=-1)  # (K, C)
    positives = logits.diagonal(dim1=1, dim2=2)
    return ((negatives - positives) * present.to(logits.dtype)).sum()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class SplitClassifier(nn.Module):
    """A user's encoder, the channel and the base station's head as one model (what ``semfl.load``
    gives for split methods): images -> power-normalised complex symbols -> channel -> class logits."""

    def __init__(self, encoder: nn.Module, head: nn.Module, channel: nn.Module):
        super().__init__()
        self.encoder, self.head, self.channel = encoder, head, channel

    def transmit_symbols(self, images: torch.Tensor) -> torch.Tensor:
        """(B, n) complex channel input of unit mean power (the reals of :func:`symbols`, paired)."""
        f = symbols(self.encoder(images))
        return torch.view_as_complex(f.reshape(f.shape[0], -1, 2).contiguous())

    def classify(self, received: torch.Tensor) -> torch.Tensor:
        """(B, n) received complex symbols -> (B, classes) logits of the head."""
        return self.head(torch.view_as_real(received).reshape(received.shape[0], -1))

    def forward(self, images: torch.Tensor, snr_db) -> torch.Tensor:
        return self.classify(self.channel(self.transmit_symbols(images), snr_db))
