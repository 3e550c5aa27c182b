"""Export a trained model for a device: encoder and decoder as separate ``torch.export`` programs.

``encoder.pt2``: images (B, C, H, W) float32 in [0, 1] -> channel input (B, n, 2) float32, the
real and imaginary parts of n complex symbols, power-normalised to unit mean power per image
(the model's own normalisation is inside the program). ``decoder.pt2``: received symbols
(B, n, 2) -> reconstructed images (B, C, H, W) in [0, 1], or class logits (B, classes) for a split
method. The channel stays out of both: it is the air between them. ``card.json`` says what they
take and give, the channel uses, the SNR range the model was trained at and its final metrics.
Load with ``torch.export.load(path).module()``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semfl.files import atomic_text, atomic_write


class EncoderProgram(nn.Module):
    """The sender's half: images -> (B, n, 2) power-normalised symbols as real pairs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(self.model.transmit_symbols(images))


class DecoderProgram(nn.Module):
    """The receiver's half: (B, n, 2) received symbols -> images (or class logits)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.reconstructs = hasattr(model, "reconstruct")

    def forward(self, received: torch.Tensor) -> torch.Tensor:
        symbols = torch.view_as_complex(received.contiguous())
        return self.model.reconstruct(symbols) if self.reconstructs else self.model.classify(symbols)


def export_programs(codec, batch: int = 2) -> tuple[Any, Any]:
    """The codec's (encoder, decoder) as ExportedPrograms, with a dynamic batch dimension."""
    example = codec.test_images(batch)[0].to(codec.device)
    encoder, decoder = EncoderProgram(codec.model).eval(), DecoderProgram(codec.model).eval()
    dims = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        sent = encoder(example)
        enc = torch.export.export(encoder, (example,), dynamic_shapes={"images": {0: dims}})
        dec = torch.export.export(decoder, (sent,), dynamic_shapes={"received": {0: dims}})
    return enc, dec


def model_card(codec) -> dict[str, Any]:
    s = codec.summary()
    c, h, w = codec.input_shape
    sent = "real and imaginary parts of complex channel symbols, unit mean power per image"
    if hasattr(codec.model, "codebook"):  # digital VQ-JSCC: the symbols are constellation points
        sent = (f"real and imaginary parts of {len(codec.model.codebook)}-QAM codewords (unit mean energy over the "
                "constellation); the decoder detects the nearest codeword first")
    return {
        "run_dir": s["run_dir"], "method": s["method"], "model": s["model"], "round": s["round"],
        "architecture": s["architecture"], "parameters": s["parameters"],
        "encoder": {"file": "encoder.pt2", "input": {"shape": ["batch", c, h, w], "dtype": "float32", "range": [0.0, 1.0]},
                    "output": {"shape": ["batch", s["channel_uses"], 2], "dtype": "float32", "meaning": sent}},
        "decoder": {"file": "decoder.pt2", "input": {"shape": ["batch", s["channel_uses"], 2], "dtype": "float32",
                                                     "meaning": "received symbols (after the channel and equalisation)"},
                    "output": ({"shape": ["batch", c, h, w], "range": [0.0, 1.0], "meaning": "reconstructed images"}
                               if codec.kind == "images" else
                               {"shape": ["batch", codec.run.spec.num_classes], "meaning": "class logits"})},
        "channel_uses": s["channel_uses"], "channel_uses_per_pixel": s["channel_uses_per_pixel"],
        "channel": s["channel"], "trained_snr_db": s["trained_snr_db"], "final_metrics": s["final_metrics"],
        "dataset": codec.cfg.dataset, "torch": torch.__version__,
    }


def export_codec(codec, out_dir: str | Path) -> dict[str, Path]:
    """Write encoder.pt2, decoder.pt2 and card.json into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    enc, dec = export_programs(codec)
    paths = {"encoder": out / "encoder.pt2", "decoder": out / "decoder.pt2", "card": out / "card.json"}
    atomic_write(paths["encoder"], lambda handle: torch.export.save(enc, handle))
    atomic_write(paths["decoder"], lambda handle: torch.export.save(dec, handle))
    atomic_text(paths["card"], json.dumps(model_card(codec), indent=1))
    return paths
