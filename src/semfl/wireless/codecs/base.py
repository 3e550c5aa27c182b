"""Codec interface and the payload type that crosses a link."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import torch

META_BITS = 32  # one float32 / int32 per metadata scalar


@dataclass
class Payload:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    codec: str = "dense"
    meta: dict[str, Any] = field(default_factory=dict)
    # per-tensor override of `codec` (e.g. FTTQ: "ternary" for quantised layers, "dense" for the
    # rest); tensors not named here use `codec`. Naming no tensor keeps the one-codec payload.
    codecs: dict[str, str] = field(default_factory=dict)

    def codec_of(self, name: str) -> str:
        return self.codecs.get(name, self.codec)

    def bits(self) -> int:
        unknown = sorted(set(self.codecs) - set(self.tensors))
        if unknown:
            raise ValueError(f"codec: per-tensor codecs name tensors not in the payload: {', '.join(unknown[:4])}")
        get_codec(self.codec)  # an unknown codec fails even on an empty payload
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in self.tensors.items():
            groups.setdefault(self.codec_of(name), {})[name] = tensor
        tensor_bits = sum(get_codec(codec).bits(group) for codec, group in groups.items())
        return tensor_bits + META_BITS * _count_scalars(self.meta)


def _count_scalars(meta: Any) -> int:
    """Scalars in nested dicts / lists / tuples (a list of lists counts every entry, not its length)."""
    if isinstance(meta, dict):
        return sum(_count_scalars(v) for v in meta.values())
    if isinstance(meta, (list, tuple)):
        return sum(_count_scalars(v) for v in meta)
    return 1


class Codec:
    """Subclasses give the exact bit count; the byte encoding is used by real transports."""

    name = "codec"

    def tensor_bits(self, tensor: torch.Tensor) -> int:
        raise NotImplementedError

    def bits(self, tensors: dict[str, torch.Tensor]) -> int:
        return sum(self.tensor_bits(t) for t in tensors.values())

    def encode(self, tensors: dict[str, torch.Tensor]) -> bytes:
        # Wire format for real transports: a torch archive of the (possibly compacted) tensors.
        # Its byte size is not the accounted size (archives carry headers); bits() is.
        buffer = io.BytesIO()
        torch.save({k: self.compact(v) for k, v in tensors.items()}, buffer)
        return buffer.getvalue()

    def decode(self, data: bytes) -> dict[str, torch.Tensor]:
        stored = torch.load(io.BytesIO(data), weights_only=True)
        return {k: self.expand(v) for k, v in stored.items()}

    def compact(self, tensor: torch.Tensor) -> Any:
        return tensor.detach().cpu()

    def expand(self, stored: Any) -> torch.Tensor:
        return stored


_CODECS: dict[str, Codec] = {}


def register_codec(codec_cls: type[Codec]) -> type[Codec]:
    _CODECS[codec_cls.name] = codec_cls()
    return codec_cls


def get_codec(name: str) -> Codec:
    if name not in _CODECS:
        raise ValueError(f"codec: unknown codec {name!r} (allowed: {', '.join(sorted(_CODECS))})")
    return _CODECS[name]


def available_codecs() -> list[str]:
    return sorted(_CODECS)
