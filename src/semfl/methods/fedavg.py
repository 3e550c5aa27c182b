"""FedAvg (McMahan et al. 2017): local SGD on the shared semantic model, weighted average (PSFL eq 10)."""
from __future__ import annotations

from typing import Any

import torch

from semfl.wireless.codecs import Payload
from semfl.methods.foundation import start_from_foundation
from semfl.protocol.method import Method, register_method
from semfl.objective import Objective
from semfl.protocol.context import UserContext
from semfl.training import evaluate_semantic, load_weights, local_train, weights_of
from semfl.methods.common import build_semantic_model, finish_semantic, loss_rows, reply_meta, send_and_average, train_snr


@register_method
class FedAvg(Method):
    name = "fedavg"
    # foundation.global_model starts the model from a foundation; [aggregation] picks the rule of eq 10
    tables = ("foundation", "aggregation")

    def __init__(self, run, transport):
        super().__init__(run, transport)
        self.model = build_semantic_model(run, self.cfg.model.arch)  # the one working model
        start_from_foundation(run, self.model, self.cfg.model.arch, lambda: build_semantic_model(run, self.cfg.model.arch))
        self.global_weights = weights_of(self.model)

    @classmethod
    def objective(cls, cfg) -> Objective:
        """MSE + train.task_weight * CE (training.local_train) with train.optimizer at train.lr, plus
        the model's own term where it has one (VQ-JSCC's codeword-usage term)."""
        extra = ("model.aux(codeword usage)",) if cfg.model.arch.startswith("vq") else ()
        return Objective(cfg.train.task_weight, cfg.train.optimizer, cfg.train.lr, extra)

    def handlers(self):
        handlers = {"train": self.user_train}
        if self.use_vmap():
            handlers["train:batched"] = self.users_train_batched
        return handlers

    def use_vmap(self) -> bool:
        """train.vmap: on / off / auto (on for cuda; off on cpu, where it measured slower)."""
        from semfl.methods.batched import supported

        mode = self.cfg.train.vmap
        if mode == "off" or (mode == "auto" and self.run.device.type != "cuda"):
            return False
        reason = supported(self.model, self.cfg.train)
        if reason and mode == "on":
            raise ValueError(f"train.vmap = 'on' but {reason}")
        if reason:
            self.run.log(f"train.vmap = 'auto': users train one by one, because {reason}")
        return reason is None

    def users_train_batched(self, contexts: list[UserContext], payloads: list[Payload]) -> list[Payload]:
        """The "train" handler for a group of users at once (torch.func.vmap; same result as user_train)."""
        from semfl.methods.batched import train_users_vmap

        replies = []
        chunk = self.cfg.train.vmap_users
        for start in range(0, len(contexts), chunk):
            group = contexts[start:start + chunk]
            results = train_users_vmap(
                self.model, [p.tensors for p in payloads[start:start + chunk]], [(c.x, c.y) for c in group],
                self.cfg.train, [train_snr(self.cfg, c) for c in group], self.run.classifier,
                [c.generator("batches") for c in group], draw_seeds=[c.seed for c in group])
            replies += [Payload(w, codec="dense", meta=reply_meta(self.run, self.model, c, loss, sent=w))
                        for c, (w, loss) in zip(group, results)]
        return replies

    def user_train(self, ctx: UserContext, payload: Payload) -> Payload:
        load_weights(self.model, payload.tensors)
        loss = local_train(self.model, ctx.x, ctx.y, self.cfg.train, train_snr(self.cfg, ctx),
                           self.run.classifier, ctx.generator("batches"))
        return Payload(weights_of(self.model), codec="dense", meta=reply_meta(self.run, self.model, ctx, loss))

    def expected_reply(self, kind: str) -> dict[str, torch.Tensor] | None:
        """A train reply holds one tensor per global weight (the weights or their update), same shape and dtype."""
        if kind != "train":
            return None
        return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in self.global_weights.items()}

    def run_round(self, round_: int, users: list[int]) -> dict[str, Any]:
        self.global_weights, metas = send_and_average(self.transport, users, Payload(self.global_weights, codec="dense"),
                                                      self.global_weights, aggregation=self.cfg.table("aggregation"),
                                                      reference=self.global_weights)
        return {"user_rows": loss_rows(metas)}

    def evaluate(self, round_: int) -> list[dict[str, Any]]:
        load_weights(self.model, self.global_weights)
        row = evaluate_semantic(self.model, self.run.classifier, self.run.test_x, self.run.test_y,
                                self.cfg.eval.snr_db, self.cfg.eval.batch_size)
        return [{"scope": "global", **row}]

    def state_dict(self) -> dict[str, Any]:
        return {"global_weights": self.global_weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_weights = state["global_weights"]

    def global_model(self) -> torch.nn.Module:
        load_weights(self.model, self.global_weights)
        return self.model

    def finish(self, out_dir):
        return finish_semantic(self.run, {self.name: self.global_model()}, out_dir)

    @classmethod
    def build_global(cls, run) -> torch.nn.Module:
        """A fresh model of the federated model's architecture (for :meth:`trained_models`)."""
        return build_semantic_model(run, run.cfg.model.arch)

    @classmethod
    def trained_models(cls, run, state, user_state):
        def build():
            model = cls.build_global(run)
            load_weights(model, state["global_weights"])
            return model
        return {"global": build}
