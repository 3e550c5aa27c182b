"""The base station on Flower: a transport over Flower's Grid and the generic ServerApp.

FlowerTransport has the local transport's interface (send, fetch_state, round, link), so a
method's base-station loop runs unchanged. It charges the link exactly as the local transport
does: each request's codec bits to the user's downlink when sent, each reply's codec bits to its
uplink when it arrives. Replies are handed to the method in user order, whatever order they
arrive in, so aggregation sums in the same order on both transports.

Faults: with engine.reply_timeout_s > 0 a request waits that long; users that did not answer
(their node died, or it failed) are logged, counted in the round's `missing_users`, and the round
goes on with the others. If nobody answered in a round, the run stops (Runner; resumable with --resume).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable

from semfl.wireless.codecs import Payload
from semfl.config import Config, dump_config
from semfl.files import CHECKOUT
from semfl.runtimes.flower.node import run_key
from semfl.runtimes.charging import LinkCharging
from semfl.runtimes.flower.wire import FETCH_STATE, HELLO, message_type, payload_to_record, record_to_payload, unflatten_state


class FlowerTransport(LinkCharging):
    def __init__(self, grid, cfg: Config, link, out_dir: Path, log: Callable[[str], None] = print):
        self.grid = grid
        self.cfg = cfg
        self.link = link
        self.log = log
        self.config_text = dump_config(cfg)
        self.run_key = run_key(self.config_text, str(Path(out_dir).resolve()))
        self.timeout = cfg.engine.reply_timeout_s or None
        self.handlers: dict = {}  # users' handlers run on their nodes
        self.missing: dict[int, list[int]] = {}  # round -> users that did not answer
        self.errors: dict[int, list[str]] = {}  # round -> the failed nodes' reasons, naming the user
        self._seq: dict[tuple[int, int], int] = {}
        self.node_of = self._discover()

    @property
    def num_users(self) -> int:
        return self.cfg.users

    # ------------------------------------------------------------------ nodes
    def _discover(self) -> dict[int, int]:
        """Wait for the nodes to connect and ask each which user it serves."""
        deadline = time.monotonic() + self.cfg.engine.connect_timeout_s
        node_of: dict[int, int] = {}
        while True:
            fresh = [n for n in self.grid.get_node_ids() if n not in node_of.values()]
            if fresh:
                messages = [self._message(Payload(), {"kind": HELLO}, node, HELLO) for node in fresh]
                # wait up to the connect deadline: re-sending sooner piles up ClientApp processes on a loaded host
                for reply in self.grid.send_and_receive(messages, timeout=max(30.0, deadline - time.monotonic())):
                    if reply.has_error():
                        continue
                    user = record_to_payload(reply.content)[1]["user"]
                    node = reply.metadata.src_node_id
                    if user in node_of and node_of[user] != node:
                        raise RuntimeError(f"nodes {node_of[user]} and {node} both serve user {user}")
                    if not 0 <= user < self.cfg.users:
                        raise RuntimeError(f"node {node} serves user {user}, but the config has {self.cfg.users} users")
                    node_of[user] = node
            if len(node_of) == self.cfg.users:
                self.log(f"flower: {len(node_of)} user nodes connected")
                return node_of
            if time.monotonic() > deadline:
                absent = sorted(set(range(self.cfg.users)) - set(node_of))
                raise RuntimeError(f"flower: no node for users {absent} after engine.connect_timeout_s="
                                   f"{self.cfg.engine.connect_timeout_s:g} s ({len(node_of)} of {self.cfg.users} connected)")
            time.sleep(1.0)

    def _message(self, payload: Payload, header: dict[str, Any], node: int, kind: str):
        from flwr.app import Message

        return Message(payload_to_record(payload, header), dst_node_id=node, message_type=message_type(kind),
                       group_id=str(self.round))

    def _exchange(self, requests: dict[int, tuple[Payload, dict]], kind: str) -> dict[int, Payload]:
        messages = [self._message(p, h, self.node_of[u], kind) for u, (p, h) in requests.items()]
        replies: dict[int, Payload] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            if reply.has_error():
                users = [u for u, n in self.node_of.items() if n == reply.metadata.src_node_id]
                who = f"user {users[0]}'s node" if users else f"node {reply.metadata.src_node_id}"
                reason = f"{who} failed on {kind!r}: {reply.error.reason}"
                self.errors.setdefault(self.round, []).append(reason)
                self.log(f"flower: {reason}")
                continue
            payload, header = record_to_payload(reply.content)
            replies[header["user"]] = payload
        return replies

    # ------------------------------------------------------------------ the transport interface
    def send(self, users: Iterable[int], kind: str, payload: Payload | dict[int, Payload],
             on_reply: Callable[[int, Payload], None] | None = None) -> dict[int, Payload]:
        users = list(users)
        requests = {}
        for user in users:
            request = self._downlink(user, payload)
            seq = self._seq.get((self.round, user), 0)
            self._seq[(self.round, user)] = seq + 1
            requests[user] = (request, {"user": user, "round": self.round, "seq": seq, "kind": kind,
                                        "snr_db": self.link.snr_db(self.round, user), "run_key": self.run_key,
                                        "config": self.config_text})
        replies = self._exchange(requests, kind)
        missing = [u for u in users if u not in replies]
        if missing:
            self.missing.setdefault(self.round, []).extend(missing)
            self.log(f"flower: round {self.round}: no {kind!r} reply from users {missing}; going on without them")
        kept: dict[int, Payload] = {}
        for user in sorted(replies):  # user order, as on the local transport
            self._uplink(user, replies[user], kept, on_reply, kind)
        return kept

    def fetch_state(self, user: int, keys: Iterable[str]) -> dict[str, Any] | None:
        """Entries of a user's state from its node (instrumentation: not charged to the link);
        None, logged, when the node does not answer (methods then leave that user out)."""
        header = {"user": user, "round": self.round, "keys": list(keys), "run_key": self.run_key}
        replies = self._exchange({user: (Payload(), header)}, FETCH_STATE)
        if user not in replies:
            self.log(f"flower: user {user}'s node did not return its state; it is left out of this evaluation")
            return None
        return unflatten_state(replies[user].tensors)

    def round_info(self, round_: int) -> dict[str, Any]:
        info = {"missing_users": sorted(set(self.missing.get(round_, []))), **self.rejected_info(round_)}
        if self.errors.get(round_):
            info["node_errors"] = list(self.errors[round_])
        return info

    # state_dict / load_state_dict: TransportBase's empty ones (users' states live on their nodes)


def flower_transport(grid, log: Callable[[str], None] | None = None):
    """A Runner transport factory over `grid`."""

    def make(cfg: Config, run, user_data, out_dir: Path) -> FlowerTransport:
        return FlowerTransport(grid, cfg, run.link, out_dir, log or run.log)

    make.needs_user_data = False
    return make


def resolve_run_config(run_config: dict[str, Any]) -> tuple[Config, Path, bool]:
    """semfl's config, run directory and resume flag from Flower's run config:
    `config-toml` (the config's text) or `config` (a TOML path), `set` (overrides separated by
    ';'), `out` (the run directory) and `resume`."""
    from semfl.config import ConfigError, load_config, loads_config

    overrides = [s.strip() for s in str(run_config.get("set", "")).split(";") if s.strip()]
    text = str(run_config.get("config-toml", ""))
    path = str(run_config.get("config", ""))
    if text:
        cfg = loads_config(text, overrides)
    elif path:
        candidate = Path(path).expanduser()
        if not candidate.is_absolute() and not candidate.is_file():
            candidate = CHECKOUT / path  # the repository of an editable install
        cfg = load_config(candidate, overrides)
    else:
        raise ConfigError("flower run config: set `config` (a TOML path) or `config-toml`")
    out = Path(str(run_config.get("out", "")) or f"runs/flower/{cfg.method}-{cfg.dataset}-seed{cfg.seed}").expanduser()
    return cfg, out.resolve(), bool(run_config.get("resume", False))


def serve(grid, run_config: dict[str, Any], show_progress: bool = False) -> Path:
    """The ServerApp's body: run the config over `grid` into its run directory."""
    from semfl.runtimes.run import Runner

    cfg, out, resume = resolve_run_config(run_config)
    return Runner(cfg, out, resume=resume, show_progress=show_progress, transport=flower_transport(grid)).execute()


def make_server_app():
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        serve(grid, dict(context.run_config))

    return app
