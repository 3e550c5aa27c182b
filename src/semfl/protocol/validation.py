"""Checks every user reply before a method may aggregate it, whatever the method and transport.

A user's machine is not trusted: a reply can carry NaN or infinite values, tensors of other names,
shapes or types than the base station asked for, an unknown codec, an absurd payload size or
metadata such as a sample count no user holds. :class:`ReplyCheck` names the first problem of a
reply (or None); the transport (``runtime.transport.LinkCharging``) drops a rejected reply before
the method sees it and records the user and the reason for the round's metrics
(``rejected_users``). What it cannot see: a well-formed, finite update that is merely harmful
(scaled, poisoned): that is robust aggregation's job (``methods.aggregation``).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from semfl.wireless.codecs import Payload
from semfl.wireless.codecs.base import META_BITS
from semfl.wireless.codecs.dense import dtype_bits

MAX_META_SCALARS = 1024  # metadata is a few numbers (sample count, losses, test metrics): not a side channel
TENSOR_OVERHEAD_BITS = 64  # per tensor: what a codec may add to the dense size (counts, format flags)

# (kind) -> the tensors a reply of that kind must hold (names, shapes, dtypes; e.g. meta-device tensors), or None
ExpectedReply = Callable[[str], "dict[str, torch.Tensor] | None"]


def _scalars(value: Any, path: str, out: list[tuple[str, Any]]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _scalars(item, f"{path}.{key}" if path else str(key), out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _scalars(item, f"{path}[{index}]", out)
    else:
        out.append((path, value))


def dense_bits(tensors: dict[str, torch.Tensor]) -> int:
    return sum(math.prod(t.shape) * dtype_bits(t.dtype) for t in tensors.values())


class ReplyCheck:
    """``expected(kind)``: the tensors a reply must hold (None: any names, checked for the rest);
    ``user_sizes``: each user's number of samples, the most its ``num_samples`` may claim."""

    def __init__(self, expected: ExpectedReply | None = None, user_sizes: list[int] | None = None):
        self.expected = expected
        self.user_sizes = user_sizes

    def problem(self, user: int, kind: str, reply: Any) -> str | None:
        """Why ``reply`` must not be used, or None when it is sound."""
        if not isinstance(reply, Payload):
            return f"not a payload ({type(reply).__name__})"
        if not isinstance(reply.tensors, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in reply.tensors.items()):
            return "tensors are not a mapping of names to tensors"
        for reason in (self._meta(user, reply.meta), self._tensors(kind, reply.tensors), self._size(kind, reply)):
            if reason:
                return reason
        return None

    def _meta(self, user: int, meta: Any) -> str | None:
        if not isinstance(meta, dict):
            return f"metadata is not a mapping ({type(meta).__name__})"
        scalars: list[tuple[str, Any]] = []
        _scalars(meta, "", scalars)
        if len(scalars) > MAX_META_SCALARS:
            return f"metadata holds {len(scalars)} values (at most {MAX_META_SCALARS})"
        for path, value in scalars:
            if value is not None and not isinstance(value, (bool, int, float, str)):
                return f"metadata {path} is a {type(value).__name__}, not a number or string"
            if isinstance(value, float) and not math.isfinite(value):
                return f"metadata {path} is {value}"
        if "num_samples" in meta:
            count = meta["num_samples"]
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                return f"metadata num_samples = {count!r} is not a sample count"
            if self.user_sizes is not None and 0 <= user < len(self.user_sizes) and count > self.user_sizes[user]:
                return f"metadata num_samples = {count} exceeds the user's {self.user_sizes[user]} samples"
        return None

    def _tensors(self, kind: str, tensors: dict[str, torch.Tensor]) -> str | None:
        expected = self.expected(kind) if self.expected is not None else None
        if expected is not None:
            missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            if missing or extra:
                parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
                        ([f"unexpected {', '.join(extra[:3])}"] if extra else [])
                return "tensor names differ from the request: " + "; ".join(parts)
            for name, like in expected.items():
                got = tensors[name]
                if tuple(got.shape) != tuple(like.shape):
                    return f"tensor {name} has shape {tuple(got.shape)}, expected {tuple(like.shape)}"
                if got.dtype != like.dtype:
                    return f"tensor {name} has dtype {got.dtype}, expected {like.dtype}"
        for name, tensor in tensors.items():
            if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                return f"tensor {name} has {bad} non-finite value{'s' if bad > 1 else ''}"
        return None

    def _size(self, kind: str, reply: Payload) -> str | None:
        try:
            bits = reply.bits()
        except Exception as exc:  # an unknown codec, per-tensor codecs naming absent tensors, ...
            return f"payload size cannot be computed: {exc}"
        expected = self.expected(kind) if self.expected is not None else None
        if expected is not None:
            limit = dense_bits(expected) + TENSOR_OVERHEAD_BITS * len(expected) + META_BITS * MAX_META_SCALARS
            if bits > limit:
                return f"payload of {bits} bits exceeds the {limit} bits any codec takes for the requested tensors"
        return None


def nonfinite_entries(state: Any, path: str = "") -> list[str]:
    """Names of the floating tensors in a (nested) state that hold NaN or infinite values."""
    if isinstance(state, torch.Tensor):
        finite = not (state.is_floating_point() or state.is_complex()) or bool(torch.isfinite(state).all())
        return [] if finite else [path or "<tensor>"]
    if isinstance(state, dict):
        return [name for key, value in state.items() for name in nonfinite_entries(value, f"{path}/{key}" if path else str(key))]
    if isinstance(state, (list, tuple)):
        return [name for i, value in enumerate(state) for name in nonfinite_entries(value, f"{path}[{i}]")]
    return []
