"""Test-only: a local transport whose user handlers one user answers maliciously (poisoning tests)."""
from __future__ import annotations

from typing import Callable

from semfl.wireless.codecs import Payload
from semfl.runtimes.local import LocalTransport
from semfl.runtimes.run import local_transport


class PoisonedTransport(LocalTransport):
    """The local transport, with ``corrupt(reply, request)`` applied to ``attacker``'s ``kind`` replies."""

    attacker: int = 0
    kind: str = "train"
    corrupt: Callable[[Payload, Payload], Payload] = staticmethod(lambda reply, request: reply)

    @property
    def handlers(self):
        return self._handlers

    @handlers.setter
    def handlers(self, handlers):
        wrapped = dict(handlers)
        if self.kind in handlers:
            honest = handlers[self.kind]

            def handler(ctx, payload):
                reply = honest(ctx, payload)
                return self.corrupt(reply, payload) if ctx.user == self.attacker else reply

            wrapped[self.kind] = handler
        self._handlers = wrapped


def poisoned(attacker: int, corrupt: Callable[[Payload, Payload], Payload], kind: str = "train"):
    """A Runner transport factory: the local transport with one malicious user."""

    def make(cfg, run, user_data, out_dir):
        transport = local_transport(cfg, run, user_data, out_dir)
        transport.__class__ = PoisonedTransport
        transport.attacker, transport.kind, transport.corrupt = attacker, kind, corrupt
        transport.handlers = transport.__dict__.pop("handlers", {})
        return transport

    return make


def scaled(factor: float) -> Callable[[Payload, Payload], Payload]:
    """The reply's tensors times ``factor``."""
    return lambda reply, request: Payload({k: v * factor for k, v in reply.tensors.items()}, reply.codec, reply.meta,
                                          reply.codecs)


def scaled_update(factor: float) -> Callable[[Payload, Payload], Payload]:
    """For replies that are weights: the update (reply - requested weights) times ``factor``."""
    def corrupt(reply: Payload, request: Payload) -> Payload:
        sent = {k: request.tensors[k] + factor * (v - request.tensors[k]) for k, v in reply.tensors.items()}
        return Payload(sent, reply.codec, reply.meta, reply.codecs)

    return corrupt


def with_nan(reply: Payload, request: Payload) -> Payload:
    tensors = {k: v.clone() for k, v in reply.tensors.items()}
    first = sorted(tensors)[0]
    tensors[first].view(-1)[0] = float("nan")
    return Payload(tensors, reply.codec, reply.meta, reply.codecs)
