"""Payload codecs with exact bit counts.

A payload is a dict of named tensors plus small scalar metadata. Every codec knows how many
bits its encoding of a payload takes; the transport charges exactly that to the link.
Metadata scalars (sample counts, losses) cost 32 bits each.
"""
from __future__ import annotations

from semfl.wireless.codecs.base import Codec, Payload, available_codecs, get_codec, register_codec
from semfl.wireless.codecs import dense as _dense  # noqa: F401  (registers)
from semfl.wireless.codecs import sparse as _sparse  # noqa: F401
from semfl.wireless.codecs import stc as _stc  # noqa: F401
from semfl.wireless.codecs import ternary as _ternary  # noqa: F401
from semfl.wireless.codecs import qsgd as _qsgd  # noqa: F401
from semfl.wireless.codecs import svq as _svq  # noqa: F401

__all__ = ["Codec", "Payload", "available_codecs", "get_codec", "register_codec"]
