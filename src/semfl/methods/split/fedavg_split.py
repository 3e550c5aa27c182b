"""FedAvg (McMahan et al. 2017) on FedCL's split models: the FedCL paper's FedAvg baseline.

Every user trains the whole encoder -> channel -> head locally and uploads it; the base station
averages by data size. Averaging needs one architecture, so every user has the encoder preset
`fedcl.encoder` (a heterogeneous `fedcl.encoders` list is a config error). The payloads carry the
parameters and the BatchNorm running statistics (all float tensors of the state dict).
"""
from __future__ import annotations

from typing import Any

import torch

from semfl.wireless.channel import make_channel
from semfl.config import ConfigError
from semfl.wireless.codecs import Payload
from semfl.protocol.method import Method, register_method
from semfl.methods.split.common import split_objective, build_encoder, build_head, eval_snr, evaluate_split, finish_split, float_state, load_float_state, local_train_split, split_snr, user_lr, user_test_set
from semfl.protocol.context import UserContext
from semfl.training import RunningAverage


@register_method
class FedAvgSplit(Method):
    name = "fedavg-split"
    tables = ("fedcl",)  # the encoder, head and exchange of [fedcl]
    precisions = ("fp32",)  # split learning: features and gradients cross the link in fp32

    @staticmethod
    def shared_preset(cfg) -> str:
        """Every user's encoder preset: the one of fedcl.encoders (all equal, check_config), else fedcl.encoder."""
        options = cfg.table("fedcl")
        return options.encoders[0] if options.encoders else options.encoder

    @classmethod
    def model_name(cls, cfg) -> str:
        return cls.shared_preset(cfg)

    @classmethod
    def objective(cls, cfg):
        """The head's CE only (local_train_split without centroids)."""
        return split_objective(cfg)

    @classmethod
    def check_config(cls, cfg) -> None:
        if len(set(cfg.table("fedcl").encoders)) > 1:
            raise ConfigError("fedcl.encoders: fedavg-split averages whole models and needs the same encoder for "
                              "every user (set fedcl.encoder instead)")

    def __init__(self, run, transport):
        super().__init__(run, transport)
        self.preset = self.shared_preset(self.cfg)
        self.channel = make_channel(self.cfg.channel)
        self.model = torch.nn.ModuleDict({"encoder": build_encoder(run, self.preset), "head": build_head(run)})
        self.global_state = float_state(self.model)
        run.log(f"encoders: all {self.preset}")

    def handlers(self):
        return {"train": self.user_train}

    def user_train(self, ctx: UserContext, payload: Payload) -> Payload:
        load_float_state(self.model, payload.tensors)
        loss, _, _, _ = local_train_split(self.model["encoder"], self.model["head"], self.channel, ctx.x, ctx.y,
                                          self.cfg, split_snr(self.cfg, ctx), ctx.generator("batches"),
                                          user_lr(self.cfg, ctx.user), num_classes=self.run.spec.num_classes)
        return Payload(float_state(self.model), codec="dense", meta={"num_samples": ctx.num_samples, "loss": loss})

    def run_round(self, round_: int, users: list[int]) -> dict[str, Any]:
        average, losses = RunningAverage(), {}

        def collect(user: int, reply: Payload) -> None:
            average.add(reply.tensors, reply.meta["num_samples"])
            losses[user] = reply.meta["loss"]

        self.transport.send(users, "train", Payload(self.global_state, codec="dense"), on_reply=collect)
        self.global_state = average.result(self.global_state)
        return {"user_rows": [{"user": k, "train_loss": v} for k, v in losses.items()],
                "train_loss": sum(losses.values()) / len(losses)}

    def evaluate(self, round_: int) -> list[dict[str, Any]]:
        """The global model on each user's test images (fedcl.eval_classes), as FedCL and FedProto are."""
        load_float_state(self.model, self.global_state)
        rows = []
        for user in range(self.cfg.users):
            r = evaluate_split(self.model["encoder"], self.model["head"], self.channel, *user_test_set(self.run, user),
                               eval_snr(self.cfg), self.cfg.eval.batch_size)
            rows.append({"scope": "user", "user": user, **r})
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("loss", "accuracy")}
        return [{"scope": "global", **mean, "eval_snr_db": eval_snr(self.cfg)}] + rows

    def state_dict(self) -> dict[str, Any]:
        return {"global_state": self.global_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_state = state["global_state"]

    @classmethod
    def trained_models(cls, run, state, user_state):
        """"global": the shared encoder -> channel -> head (a classifier)."""
        from semfl.models.split import SplitClassifier

        def build():
            model = torch.nn.ModuleDict({"encoder": build_encoder(run, cls.shared_preset(run.cfg)),
                                         "head": build_head(run)})
            load_float_state(model, state["global_state"])
            return SplitClassifier(model["encoder"], model["head"], make_channel(run.cfg.channel)).to(run.device)
        return {"global": build}

    def finish(self, out_dir) -> dict[str, Any]:
        load_float_state(self.model, self.global_state)
        pair = (self.model["encoder"], self.model["head"])
        return finish_split(self.run, "FedAvg", {user: pair for user in range(self.cfg.users)}, self.channel, out_dir)
