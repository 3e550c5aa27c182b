"""A user's side of a run on a Flower SuperNode: the generic ClientApp.

Every message carries the run's resolved config (TOML) and a header (round, user, kind, SNR,
sequence number). The node builds the run context once per process and run (dataset, frozen
classifier, the method's working models), serves the request with the method's user handler,
and keeps the user's persistent state (a PSFL mentor, residuals, masks, optimiser state) on its
own disk between messages, versioned by round so that a run resumed after a base-station crash
redoes a round from the state the user had before it.

Which user a node serves: node config ``user`` (deployment), else ``partition-id`` (Flower's
simulation). Where it keeps state: node config ``state-dir``, else $SEMFL_NODE_STATE_DIR, else
~/.cache/semfl/node-state. Node config ``data-root`` overrides the config's data.root.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch

from semfl.wireless.codecs import Payload
from semfl.protocol import seeding
from semfl.protocol.method import users_half
from semfl.protocol.context import UserContext
from semfl.runtimes.flower.wire import FETCH_STATE, HELLO, flatten_state, kind_of, payload_to_record, record_to_payload

_SIDES: dict[str, "NodeSide"] = {}  # run key -> context of this process (Ray actors and tests reuse it)


def run_key(config_text: str, out_dir: str) -> str:
    """Names a run's node-side state: the same config into the same run directory is the same run
    (so --resume finds the users' state again, though Flower gives it a new run id)."""
    return hashlib.sha256(f"{out_dir}\n{config_text}".encode()).hexdigest()[:16]


def node_user(node_config: dict[str, Any]) -> int:
    for key in ("user", "partition-id"):
        if key in node_config:
            return int(node_config[key])
    raise ValueError("node config: name the user this node serves with user=<index> (or partition-id)")


def state_root(node_config: dict[str, Any]) -> Path:
    root = node_config.get("state-dir") or os.environ.get("SEMFL_NODE_STATE_DIR") or "~/.cache/semfl/node-state"
    return Path(str(root)).expanduser()


class UserStateStore:
    """One user's persistent state on the node's disk: one file per round, written atomically.

    The first message of round t starts from the newest state of a round before t (files of round
    t or later are leftovers of an interrupted attempt and are dropped); later messages of the
    round continue from round t's file. Older files than the one a round started from are removed.
    """

    _NAME = re.compile(r"round-(\d+)\.pt$")

    def __init__(self, folder: Path):
        self.folder = folder

    def _rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := self._NAME.search(p.name)))

    def _path(self, round_: int) -> Path:
        return self.folder / f"round-{round_}.pt"

    def load(self, round_: int, seq: int) -> dict[str, Any]:
        if seq == 0:
            for r in self._rounds():
                if r >= round_:
                    self._path(r).unlink(missing_ok=True)
        return self.latest(round_)

    def latest(self, round_: int) -> dict[str, Any]:
        """The newest state of a round up to `round_` ({} before the user's first message)."""
        rounds = [r for r in self._rounds() if r <= round_]
        return torch.load(self._path(rounds[-1]), weights_only=False) if rounds else {}

    def save(self, round_: int, state: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".round-{round_}.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self._path(round_))
        # keep the newest state before this round: a resumed round_ starts again from it, and a
        # user who skipped rounds (participation < 1) may have last saved long before round_ - 1
        older = [r for r in self._rounds() if r < round_]
        for r in older[:-1]:
            self._path(r).unlink(missing_ok=True)


class NodeSide:
    """The run as one node process sees it: context, method and handlers, users' data on demand."""

    def __init__(self, config_text: str, data_root: str | None):
        from semfl.config import loads_config
        from semfl.methods import get_method
        from semfl.runtimes.run import build_context

        cfg = loads_config(config_text)
        if data_root:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(data_root)))
        self.cfg = cfg
        seeding.enter(cfg.seed, "setup")
        self.run, _ = build_context(cfg, None, log=lambda message: None, with_user_data=False)
        seeding.enter(cfg.seed, "init")
        self.method = users_half(get_method(cfg.method), self.run)
        self.handlers = self.method.handlers()
        self._data: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def user_data(self, user: int) -> tuple[torch.Tensor, torch.Tensor]:
        from semfl.runtimes.run import user_slice

        if user not in self._data:
            self._data[user] = user_slice(self.run, user)
        return self._data[user]


def node_side(config_text: str, node_config: dict[str, Any]) -> NodeSide:
    data_root = node_config.get("data-root")
    key = hashlib.sha256(f"{data_root}\n{config_text}".encode()).hexdigest()
    if key not in _SIDES:
        _SIDES.clear()  # one run at a time per process: free the previous run's data and models
        _SIDES[key] = NodeSide(config_text, data_root)
    return _SIDES[key]


def handle(message, context):
    """Serve one message for the user this node holds; the reply carries the same header."""
    from flwr.app import Message

    payload, header = record_to_payload(message.content)
    user = node_user(context.node_config)
    kind = kind_of(message.metadata.message_type, header)
    if kind == HELLO:
        return Message(payload_to_record(Payload(), {"user": user}), reply_to=message)
    if header["user"] != user:
        raise ValueError(f"message for user {header['user']} reached the node of user {user}")
    store = UserStateStore(state_root(context.node_config) / header["run_key"] / f"user-{user}")
    if kind == FETCH_STATE:
        state = store.latest(header["round"])
        entries = flatten_state({k: state[k] for k in header["keys"] if k in state})
        return Message(payload_to_record(Payload(entries), header), reply_to=message)
    side = node_side(header["config"], context.node_config)
    if kind not in side.handlers:
        raise ValueError(f"method {side.cfg.method!r} has no user handler for {kind!r}")
    x, y = side.user_data(user)
    state = store.load(header["round"], header["seq"])
    ctx = UserContext(user=user, round=header["round"], x=x, y=y, snr_db=header["snr_db"], state=state,
                      seed=seeding.derive_seed(side.cfg.seed, header["round"], user, kind), device=side.run.device)
    seeding.enter(ctx.seed)
    reply = side.handlers[kind](ctx, payload)
    store.save(header["round"], state)
    return Message(payload_to_record(reply, {"user": user, "round": header["round"], "kind": kind}),
                   reply_to=message)


def make_client_app():
    """The generic ClientApp: train, evaluate, semfl's own queries, and plain query for every other
    request kind of any method (the kind travels in the header)."""
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(handle)
    app.evaluate()(handle)
    app.query()(handle)
    for kind in (HELLO, FETCH_STATE):
        app.query(kind)(handle)
    return app
