"""What a user handler sees: its context (local data, persistent state, seed) and the handler type."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from semfl.protocol import seeding
from semfl.wireless.codecs import Payload

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
