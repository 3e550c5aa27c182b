"""Payloads as Flower records, and request kinds as Flower message types.

A payload travels as a RecordDict: its tensors, unchanged and lossless, in an ArrayRecord; its
codec names and metadata (JSON) in a ConfigRecord; and a header (round, user, kind, ...) in
another ConfigRecord. The link is charged the codec's exact bit count (Payload.bits()), as on the
local transport, not the size of this encoding: the wire is the carrier, the codec is the model
of what the radio sends.
"""
from __future__ import annotations

import json
from typing import Any

import torch

from semfl.wireless.codecs import Payload

BUILTIN_CATEGORIES = ("train", "evaluate")
HELLO = "semfl_hello"  # query: which user does this node serve?
FETCH_STATE = "semfl_state"  # query: entries of a user's persistent state (evaluation, figures)


def message_type(kind: str) -> str:
    """A request kind as a Flower message type: train / evaluate as themselves, semfl's own queries
    as query.<kind>, and every other method kind as plain ``query`` with the kind in the header, so
    the ClientApp needs no list of the methods' kinds."""
    if kind in BUILTIN_CATEGORIES:
        return kind
    if kind in (HELLO, FETCH_STATE):
        return f"query.{kind}"
    if not kind.isidentifier():  # e.g. "train:batched": a local transport's way of serving, never sent
        raise ValueError(f"request kind {kind!r} cannot cross the wire (must be an identifier)")
    return "query"


def kind_of(message_type_: str, header: dict[str, Any]) -> str:
    """The request kind of a message: its action, or for plain ``query`` the header's kind."""
    category, _, action = message_type_.partition(".")
    if category != "query":
        return category
    if action:
        return action
    if "kind" not in header:
        raise ValueError("a plain query message must name its request kind in the header")
    return header["kind"]


def _json_default(value: Any) -> Any:
    raise TypeError(f"payload metadata: {type(value).__name__} is not JSON-serialisable; use plain numbers, "
                    "strings, lists or dicts")


def payload_to_record(payload: Payload, header: dict[str, Any]):
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    tensors = {k: v.detach().cpu().contiguous() for k, v in payload.tensors.items()}
    body = ConfigRecord({"codec": payload.codec, "codecs": json.dumps(payload.codecs),
                         "meta": json.dumps(payload.meta, default=_json_default)})
    head = ConfigRecord({"json": json.dumps(header, default=_json_default)})
    return RecordDict({"tensors": ArrayRecord(torch_state_dict=tensors), "payload": body, "header": head})


def record_to_payload(record) -> tuple[Payload, dict[str, Any]]:
    header = json.loads(record.config_records["header"]["json"])
    body = record.config_records["payload"]
    tensors: dict[str, torch.Tensor] = dict(record.array_records["tensors"].to_torch_state_dict())
    return Payload(tensors, codec=body["codec"], meta=json.loads(body["meta"]),
                   codecs=json.loads(body["codecs"])), header


def flatten_state(entries: dict[str, Any]) -> dict[str, torch.Tensor]:
    """{key: {name: tensor}} or {key: tensor} -> {"key/name": tensor} (state entries for fetch_state)."""
    flat = {}
    for key, value in entries.items():
        if isinstance(value, torch.Tensor):
            flat[key] = value
        elif isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values()):
            flat.update({f"{key}/{name}": v for name, v in value.items()})
        else:
            raise TypeError(f"fetch_state: state entry {key!r} is not a tensor or a dict of tensors")
    return flat


def unflatten_state(flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in flat.items():
        key, sep, rest = name.partition("/")
        if sep:
            out.setdefault(key, {})[rest] = value
        else:
            out[key] = value
    return out
