"""FedPAQ (Reisizadeh et al. 2020): periodic averaging with a QSGD-quantised uplink.

Each round the runner samples r = ceil(train.participation * n) of the n users. A user trains tau
local steps (`fedpaq.local_steps`; 0 = train.local_epochs epochs) from the dense global model and
uploads Q_s(x_local - x_global) per tensor with s = `fedpaq.levels` levels (codec "qsgd<s>",
semfl.wireless.compress.qsgd_bits per tensor). The base station applies x <- x + (1/r) sum Q, the paper's
plain mean (`fedpaq.weighting = "samples"` weights it by sample count instead), and broadcasts
the model dense.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from semfl.wireless.codecs import Payload
from semfl.wireless.codecs.qsgd import QSGD_LEVELS, qsgd_codec_name
from semfl.wireless.compress import qsgd
from semfl.config import ConfigError, option, register_table
from semfl.protocol.method import register_method
from semfl.methods.common import loss_rows, reply_meta, send_and_average, train_delta
from semfl.methods.fedavg import FedAvg
from semfl.protocol.context import UserContext


@dataclass
class FedPAQOptions:
    levels: int = option(16, "s of QSGD")
    local_steps: int = option(0, "tau; 0 = train.local_epochs epochs")
    weighting: str = option("uniform", "uniform: the paper's mean; samples: eq 10's weights")

    def validate(self, cfg) -> None:
        if self.levels not in QSGD_LEVELS:
            raise ConfigError(f"fedpaq.levels: must be one of {', '.join(map(str, QSGD_LEVELS))}, got {self.levels}")
        if self.local_steps < 0:
            raise ConfigError(f"fedpaq.local_steps: must be >= 0 (0 = train.local_epochs), got {self.local_steps}")
        if self.weighting not in ("uniform", "samples"):
            raise ConfigError(f"fedpaq.weighting: expected 'uniform' or 'samples', got {self.weighting!r}")


register_table("fedpaq", FedPAQOptions)


@register_method
class FedPAQ(FedAvg):
    """FedAvg's model, evaluation, checkpoint and finish; tau local steps and a QSGD uplink."""

    name = "fedpaq"
    tables = FedAvg.tables + ("fedpaq",)

    def __init__(self, run, transport):
        super().__init__(run, transport)
        self.options: FedPAQOptions = self.cfg.table("fedpaq")
        self.uplink_codec = qsgd_codec_name(self.options.levels)

    def handlers(self):
        # no "train:batched" (FedAvg's vmapped training): the uplink compression is per user
        return {"train": self.user_train}

    def user_train(self, ctx: UserContext, payload: Payload) -> Payload:
        delta, loss, _ = train_delta(self.run, self.model, payload.tensors, ctx, steps=self.options.local_steps)
        generator = ctx.generator("qsgd")
        sent = {k: qsgd(d, self.options.levels, generator) for k, d in delta.items()}
        return Payload(sent, codec=self.uplink_codec, meta=reply_meta(self.run, self.model, ctx, loss))

    def run_round(self, round_: int, users: list[int]) -> dict[str, Any]:
        weight = None if self.options.weighting == "samples" else (lambda reply: 1.0)
        mean, metas = send_and_average(self.transport, users, Payload(self.global_weights, codec="dense"),
                                        self.global_weights, weight, aggregation=self.cfg.table("aggregation"))
        self.global_weights = {k: v + mean[k] for k, v in self.global_weights.items()}
        return {"user_rows": loss_rows(metas), "participants": len(users)}
