"""FedAvg with a top-k uplink and error feedback (Stich 2018; Karimireddy et al. 2019).

A user trains from the dense global model, v = dW + e_k (e_k its residual, kept in its state),
sends top_k(v) (k = ceil(fraction * N) per tensor, or over all tensors with scope "global") with
codec "sparse" and keeps e_k <- v - top_k(v). The base station adds the weighted mean (PSFL eq 10)
of the sparse updates to the global model and broadcasts it dense.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from semfl.wireless.codecs import Payload
from semfl.wireless.compress import topk_error_feedback
from semfl.config import ConfigError, option, register_table
from semfl.protocol.method import register_method
from semfl.methods.common import loss_rows, reply_meta, send_and_average, to_cpu, to_device, train_delta
from semfl.methods.fedavg import FedAvg
from semfl.protocol.context import UserContext


@dataclass
class TopKOptions:
    fraction: float = option(0.01, "k / N")
    scope: str = option("layer", "layer: k per tensor; global: k over all tensors together")

    def validate(self, cfg) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"topk.fraction: must be in (0, 1], got {self.fraction}")
        if self.scope not in ("layer", "global"):
            raise ConfigError(f"topk.scope: expected 'layer' or 'global', got {self.scope!r}")


register_table("topk", TopKOptions)


@register_method
class TopK(FedAvg):
    """FedAvg's global model, evaluation and checkpoint; a compressed uplink."""

    name = "topk"
    tables = FedAvg.tables + ("topk",)

    def __init__(self, run, transport):
        super().__init__(run, transport)
        self.options: TopKOptions = self.cfg.table("topk")

    def handlers(self):
        # no "train:batched" (FedAvg's vmapped training): the uplink compression is per user
        return {"train": self.user_train}

    def user_train(self, ctx: UserContext, payload: Payload) -> Payload:
        delta, loss, _ = train_delta(self.run, self.model, payload.tensors, ctx)
        sent, residual = topk_error_feedback(delta, to_device(ctx.state.get("residual"), self.run.device),
                                             self.options.fraction, self.options.scope)
        ctx.state["residual"] = to_cpu(residual)
        return Payload(sent, codec="sparse", meta=reply_meta(self.run, self.model, ctx, loss))

    def run_round(self, round_: int, users: list[int]) -> dict[str, Any]:
        mean, metas = send_and_average(self.transport, users, Payload(self.global_weights, codec="dense"),
                                        self.global_weights, aggregation=self.cfg.table("aggregation"))
        self.global_weights = {k: v + mean[k] for k, v in self.global_weights.items()}
        return {"user_rows": loss_rows(metas)}
