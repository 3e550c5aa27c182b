"""The source codec of the separation baseline: Pillow's JPEG (and WebP where Pillow has it), with
the bits a receiver could not already know.

Header stripping. For a 28x28 image a JPEG file's headers (quantisation and Huffman tables, frame
and scan headers: ~600 bytes) are several times the budget, so, as the DeepJSCC literature does for
BPG, only what the receiver cannot know in advance is counted and sent. JPEG is encoded with the
standard Huffman tables (``optimize=False``), so everything up to the end of the scan header is a
function of (quality, image size, mode) alone: the receiver rebuilds it from a template and appends
the received entropy-coded segment and the end marker. For WebP the RIFF/VP8 container (20 bytes)
is rebuilt from the payload length; the VP8 bitstream itself is sent whole. Each image's
transmitted bitstream is ``[quality index][payload length in bytes][payload]`` (the two fields
take ``QUALITY_BITS`` and ``length_bits(capacity)`` bits), so the receiver can decode it alone.
The file's size with headers is reported too (:meth:`ImageCodec.encode` returns both).
"""
from __future__ import annotations

import functools
import io
import math
import struct

import numpy as np

QUALITIES = (1, 2, 3, 5, 8, 10, 13, 16, 20, 25, 30, 40, 50, 60, 70, 80, 90, 95)  # the qualities tried
QUALITY_BITS = math.ceil(math.log2(len(QUALITIES)))


def length_bits(capacity_bits: int) -> int:
    """Bits of the payload-length field for a channel budget of ``capacity_bits``."""
    return max(1, math.ceil(math.log2(capacity_bits // 8 + 1)))


def available() -> tuple[str, ...]:
    from PIL import features

    return ("jpeg", "webp") if features.check("webp") else ("jpeg",)


def _pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


class ImageCodec:
    """``encode(image, quality) -> (payload, file_bytes)`` and ``decode(payload, quality, shape)``
    for uint8 images of shape (H, W, C) with C in (1, 3)."""

    def __init__(self, name: str = "jpeg"):
        if name not in available():
            raise ValueError(f"image codec {name!r} is not available here; choose one of {available()}")
        self.name = name

    def _file(self, image: np.ndarray, quality: int) -> bytes:
        buf = io.BytesIO()
        if self.name == "jpeg":
            _pil(image).save(buf, "JPEG", quality=quality, optimize=False)
        else:  # WebP works on RGB: grey images are sent as such and turned back into grey
            _pil(np.repeat(image, 3, -1) if image.shape[-1] == 1 else image).save(buf, "WEBP", quality=quality, method=6)
        return buf.getvalue()

    @functools.lru_cache(maxsize=256)
    def _jpeg_prefix(self, quality: int, shape: tuple[int, ...]) -> bytes:
        """Everything up to the end of the scan header: fixed by (quality, shape)."""
        return _split_jpeg(self._file(np.zeros(shape, np.uint8), quality))[0]

    def encode(self, image: np.ndarray, quality: int) -> tuple[bytes, int]:
        """(the stripped payload, the whole file's size in bytes)."""
        data = self._file(image, quality)
        if self.name == "jpeg":
            prefix, payload = _split_jpeg(data)
            if prefix != self._jpeg_prefix(quality, image.shape):
                raise RuntimeError("JPEG headers depend on the image content; header stripping is not valid")
            return payload, len(data)
        if data[12:16] != b"VP8 ":
            raise RuntimeError(f"unexpected WebP chunk {data[12:16]!r}")
        size = struct.unpack("<I", data[16:20])[0]
        return data[20:20 + size], len(data)

    def decode(self, payload: bytes, quality: int, shape: tuple[int, ...]) -> np.ndarray:
        """The image (H, W, C) uint8 from a payload; raises on a corrupt bitstream."""
        from PIL import Image

        if self.name == "jpeg":
            data = self._jpeg_prefix(quality, shape) + payload + b"\xff\xd9"
        else:
            chunk = b"VP8 " + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) % 2)
            data = b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = img.convert("L" if shape[-1] == 1 else "RGB")
            out = np.asarray(img)
        return out.reshape(shape)


def _split_jpeg(data: bytes) -> tuple[bytes, bytes]:
    """(headers through the scan header, entropy-coded segment without the end marker)."""
    sos = data.find(b"\xff\xda")
    if sos < 0 or not data.endswith(b"\xff\xd9"):
        raise RuntimeError("not a baseline JPEG stream")
    end = sos + 2 + struct.unpack(">H", data[sos + 2:sos + 4])[0]
    return data[:end], data[end:-2]


def _field(value: int, width: int) -> np.ndarray:
    """``value`` as ``width`` bits, most significant first."""
    return ((value >> np.arange(width - 1, -1, -1)) & 1).astype(np.uint8)


def _value(bits: np.ndarray) -> int:
    return int(bits.astype(np.int64) @ (1 << np.arange(len(bits) - 1, -1, -1, dtype=np.int64)))


def to_bits(payload: bytes, quality_index: int, capacity_bits: int) -> np.ndarray:
    """The transmitted bitstream [quality index][length][payload], zero-padded to capacity_bits."""
    if stream_bits(payload, capacity_bits) > capacity_bits:
        raise ValueError(f"{stream_bits(payload, capacity_bits)} bits do not fit the budget of {capacity_bits}")
    bits = np.concatenate([_field(quality_index, QUALITY_BITS), _field(len(payload), length_bits(capacity_bits)),
                           np.unpackbits(np.frombuffer(payload, np.uint8))])
    return np.pad(bits, (0, capacity_bits - len(bits)))


def from_bits(bits: np.ndarray, capacity_bits: int) -> tuple[int, bytes]:
    """Inverse of :func:`to_bits`: (quality index, payload)."""
    lb = length_bits(capacity_bits)
    q = _value(bits[:QUALITY_BITS])
    n = _value(bits[QUALITY_BITS:QUALITY_BITS + lb])
    start = QUALITY_BITS + lb
    if q >= len(QUALITIES) or start + 8 * n > len(bits):
        raise ValueError("corrupt header")
    return q, np.packbits(bits[start:start + 8 * n]).tobytes()


def stream_bits(payload: bytes, capacity_bits: int) -> int:
    """Bits :func:`to_bits` uses for ``payload`` (before padding)."""
    return QUALITY_BITS + length_bits(capacity_bits) + 8 * len(payload)
