"""STC, sparse ternary compression (Sattler et al. 2019) on uplink and downlink.

Uplink: a user trains from its copy of the global model, dW = w_local - w_global, keeps a residual
A_k in its state and sends STC(A_k + dW) (codec "stc"); A_k <- A_k + dW - sent.
Base station: averages the received updates (weighted by sample count as PSFL eq 10, or uniform:
`stc.weighting`), adds its own residual A_s, sends STC(A_s + mean) on the downlink
(`stc.downlink_sparsity`, default the uplink p) and applies exactly that to w_global, so every user
that holds the previous global model rebuilds the new one bit for bit: w <- w + STC(...).

Synchronisation: the base station records, per user, the model version it last sent
(`synced`, checkpointed). A user that holds version v-1 gets the STC update of the last round; a
user that missed a round (partial participation) or never took part gets the dense global model
(codec "dense", 32 bits per weight), charged as such. So round 1 costs one dense broadcast per
user: the paper's shared random initialisation is not assumed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from semfl.wireless.codecs import Payload
from semfl.wireless.compress import stc_error_accumulation
from semfl.config import ConfigError, option, register_table
from semfl.protocol.method import register_method
from semfl.methods.common import loss_rows, reply_meta, send_and_average, to_cpu, to_device, train_delta
from semfl.methods.fedavg import FedAvg
from semfl.protocol.context import UserContext


@dataclass
class STCOptions:
    sparsity: float = option(1 / 400, "p of the paper's experiments (0.001 in the authors' code)")
    downlink_sparsity: float = option(0.0, "0 = the uplink p")
    weighting: str = option("samples", "samples: eq 10's weights; uniform: the plain mean of the paper")

    def validate(self, cfg) -> None:
        if not 0 < self.sparsity <= 1:
            raise ConfigError(f"stc.sparsity: must be in (0, 1], got {self.sparsity}")
        if not 0 <= self.downlink_sparsity <= 1:
            raise ConfigError(f"stc.downlink_sparsity: must be in [0, 1] (0 = stc.sparsity), got {self.downlink_sparsity}")
        if self.weighting not in ("samples", "uniform"):
            raise ConfigError(f"stc.weighting: expected 'samples' or 'uniform', got {self.weighting!r}")


register_table("stc", STCOptions)


@register_method
class STC(FedAvg):
    """FedAvg's model, evaluation and finish; STC both ways with residuals on users and server."""

    name = "stc"
    tables = FedAvg.tables + ("stc",)

    def __init__(self, run, transport):
        super().__init__(run, transport)
        self.options: STCOptions = self.cfg.table("stc")
        self.residual = {k: torch.zeros_like(v) for k, v in self.global_weights.items()}  # server's A_s
        self.version = 0  # downlink updates applied to global_weights so far
        self.last_update: dict[str, torch.Tensor] | None = None  # the STC update version-1 -> version
        self.synced: dict[int, int] = {}  # user -> model version it holds

    # ------------------------------------------------------------------ user side
    def handlers(self):
        # no "train:batched" (FedAvg's vmapped training): the uplink compression is per user
        return {"train": self.user_train}

    def user_train(self, ctx: UserContext, payload: Payload) -> Payload:
        device = self.run.device
        if payload.codec == "stc":  # the last round's compressed global update
            if "weights" not in ctx.state:
                raise RuntimeError(f"stc: user {ctx.user} got an update but holds no model")
            weights = {k: v.to(device) + payload.tensors[k].to(device) for k, v in ctx.state["weights"].items()}
        else:  # the dense global model
            weights = {k: v.to(device) for k, v in payload.tensors.items()}
        ctx.state["weights"] = to_cpu(weights)
        delta, loss, _ = train_delta(self.run, self.model, weights, ctx)
        sent, residual = stc_error_accumulation(delta, to_device(ctx.state.get("residual"), device),
                                                self.options.sparsity)
        ctx.state["residual"] = to_cpu(residual)
        return Payload(sent, codec="stc", meta=reply_meta(self.run, self.model, ctx, loss))

    # ------------------------------------------------------------------ base station
    def downlink(self, users: list[int]) -> dict[int, Payload]:
        """The last STC update to users holding the previous model, the dense model to the rest."""
        out = {}
        for user in users:
            if self.last_update is not None and self.synced.get(user) == self.version - 1:
                out[user] = Payload(self.last_update, codec="stc")
            else:
                out[user] = Payload(self.global_weights, codec="dense")
            self.synced[user] = self.version
        return out

    def run_round(self, round_: int, users: list[int]) -> dict[str, Any]:
        requests = self.downlink(users)
        dense = sum(1 for p in requests.values() if p.codec == "dense")
        weight = None if self.options.weighting == "samples" else (lambda reply: 1.0)
        mean, metas = send_and_average(self.transport, users, requests, self.global_weights, weight,
                                        aggregation=self.cfg.table("aggregation"))
        p_down = self.options.downlink_sparsity or self.options.sparsity
        update, self.residual = stc_error_accumulation(mean, self.residual, p_down)
        self.global_weights = {k: v + update[k] for k, v in self.global_weights.items()}
        self.last_update = update
        self.version += 1
        return {"user_rows": loss_rows(metas), "dense_downlinks": dense}

    def state_dict(self) -> dict[str, Any]:
        return {"global_weights": self.global_weights, "residual": self.residual, "version": self.version,
                "last_update": self.last_update, "synced": dict(self.synced)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_weights = state["global_weights"]
        self.residual = state["residual"]
        self.version = state["version"]
        self.last_update = state["last_update"]
        self.synced = {int(k): int(v) for k, v in state["synced"].items()}
