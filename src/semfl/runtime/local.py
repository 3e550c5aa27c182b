"""The local transport: users live in this process; payloads are handed over without serialising.

The transport, not the method, charges every payload to the link: the downlink bits of each
request and the uplink bits of each reply, per user and round, at that user's SNR.
Per-user persistent state stays here between rounds (on the CPU; a method moves what it needs
to the device for the active user only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from semfl.codecs import Payload
from semfl.link import Link
from semfl.runtime import seeding

Handler = Callable[["UserContext", Payload], Payload]


@dataclass
class UserContext:
    user: int
    round: int
    x: torch.Tensor  # local images, float NCHW on the run device
    y: torch.Tensor  # local labels
    snr_db: float  # this user's link SNR this round (also its training channel SNR by default)
    state: dict[str, Any]  # persistent across rounds: mentors, residuals, masks, ...
    seed: int  # derived for (run seed, round, user, request kind)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def generator(self, purpose: str = "") -> torch.Generator:
        return seeding.generator(self.seed, purpose)


class LocalTransport:
    def __init__(self, link: Link, user_data: list[tuple[torch.Tensor, torch.Tensor]], seed: int,
                 device: torch.device, handlers: dict[str, Handler]):
        self.link = link
        self.user_data = user_data
        self.seed = seed
        self.device = device
        self.handlers = handlers
        self.states: dict[int, dict[str, Any]] = {k: {} for k in range(len(user_data))}
        self.round = 0
        self.on_user_done: Callable[[int], None] | None = None

    @property
    def num_users(self) -> int:
        return len(self.user_data)

    def context(self, user: int, kind: str) -> UserContext:
        x, y = self.user_data[user]
        return UserContext(user=user, round=self.round, x=x, y=y, snr_db=self.link.snr_db(self.round, user),
                           state=self.states[user], seed=seeding.derive_seed(self.seed, self.round, user, kind),
                           device=self.device)

    def send(self, users: Iterable[int], kind: str, payload: Payload | dict[int, Payload],
             on_reply: Callable[[int, Payload], None] | None = None) -> dict[int, Payload]:
        """Send a request to each user and collect the replies.

        `payload` is one broadcast payload (charged to every user's downlink) or one per user.
        With `on_reply`, each reply is handed over as it arrives and not kept, so a base station
        can aggregate as a running sum instead of holding K updates.
        """
        if kind not in self.handlers:
            raise KeyError(f"no user handler for request kind {kind!r} (have: {', '.join(sorted(self.handlers))})")
        handler = self.handlers[kind]
        replies: dict[int, Payload] = {}
        for user in users:
            request = payload[user] if isinstance(payload, dict) else payload
            self.link.send(self.round, user, "downlink", request.bits())
            ctx = self.context(user, kind)
            seeding.enter(ctx.seed)
            reply = handler(ctx, request)
            self.link.send(self.round, user, "uplink", reply.bits())
            if self.on_user_done is not None:
                self.on_user_done(user)
            if on_reply is None:
                replies[user] = reply
            else:
                on_reply(user, reply)
        return replies

    def state_dict(self) -> dict:
        return {"states": self.states}

    def load_state_dict(self, state: dict) -> None:
        self.states = state["states"]
