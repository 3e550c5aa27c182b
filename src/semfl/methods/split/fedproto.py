"""FedProto (Tan et al., AAAI 2022) on FedCL's split models: the baseline of the FedCL paper.

Each user trains its own encoder -> channel -> head locally (heterogeneous encoders allowed, the
same `fedcl.encoders` assignment as FedCL) with CE + lam * MSE(f_hat, global prototype of its class)
on the received noisy features f_hat, and uploads its local prototypes (class means of f_hat over
its last local epoch) with their class indices and sample counts. The base station averages each
class's prototypes over the users holding it, **weighted by their sample counts** (the paper's
eq 6; the authors' code averages unweighted: `fedproto.weighted = false`), and broadcasts the
global prototypes with a bitmap of the classes that have one. Round 1 has no prototypes yet, so
its local loss is CE only.

Inference: each user's encoder with its own head (`accuracy`, the figure's metric) and nearest
global prototype (`proto_accuracy`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from semfl.wireless.channel import make_channel
from semfl.wireless.codecs import Payload
from semfl.config import ConfigError, option, register_table
from semfl.protocol.method import Method, register_method
from semfl.methods.split.common import assign_encoders, encoders_name, split_objective, build_encoder, build_head, eval_snr, evaluate_split, finish_split, float_state, load_float_state, local_train_split, split_snr, user_lr, user_test_set
from semfl.models.split import FEATURE_DIM
from semfl import rng
from semfl.protocol import seeding
from semfl.protocol.context import UserContext


@dataclass
class FedProtoOptions:
    lam: float = option(1.0, "weight of the prototype MSE (paper: 1; 0.1 on CIFAR-10)")
    weighted: bool = option(True, "average prototypes weighted by sample counts (paper) or unweighted (authors' code)")

    def validate(self, cfg) -> None:
        if self.lam < 0:
            raise ConfigError(f"fedproto.lam: must be >= 0, got {self.lam}")


register_table("fedproto", FedProtoOptions)


def average_prototypes(replies: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], classes: int,
                       weighted: bool, dim: int = FEATURE_DIM) -> tuple[torch.Tensor, torch.Tensor]:
    """replies: (prototypes (n, d), class indices (n,), counts (n,)) per user -> (C, d) global
    prototypes and (C,) bool of the classes some user holds."""
    sums = torch.zeros(classes, dim, dtype=torch.float64)
    weights = torch.zeros(classes, dtype=torch.float64)
    for protos, idx, counts in replies:
        w = counts.double() if weighted else torch.ones(len(idx), dtype=torch.float64)
        sums.index_add_(0, idx.cpu(), protos.double().cpu() * w[:, None].cpu())
        weights.index_add_(0, idx.cpu(), w.cpu())
    present = weights > 0
    return (sums / weights.clamp_min(1e-12)[:, None]).float(), present


@register_method
class FedProto(Method):
    name = "fedproto"
    tables = ("fedcl", "fedproto")  # the encoders of [fedcl]
    precisions = ("fp32",)  # split learning: features and gradients cross the link in fp32

    @classmethod
    def model_name(cls, cfg) -> str:
        return encoders_name(cfg.table("fedcl"))

    @classmethod
    def objective(cls, cfg):
        """CE + lam * MSE(f_hat, the global prototype of its class) (local_train_split, mse=True)."""
        return split_objective(cfg, f"{cfg.table('fedproto').lam:g}*MSE(f_hat, prototype of its class)")

    def __init__(self, run, transport):
        super().__init__(run, transport)
        self.options: FedProtoOptions = self.cfg.table("fedproto")
        self.channel = make_channel(self.cfg.channel)
        self.encoder_of = assign_encoders(run.user_sizes, self.cfg.table("fedcl"))
        self._encoders: dict[str, torch.nn.Module] = {}
        self.head = build_head(run)  # one working head (each user has its own weights)
        self.prototypes: torch.Tensor | None = None
        self.present: torch.Tensor | None = None
        run.log("encoders: " + ", ".join(f"u{k}={e}" for k, e in enumerate(self.encoder_of)))

    def handlers(self):
        return {"train": self.user_train}

    def user_models(self, state: dict, user: int) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The working encoder of the user's preset and the working head, loaded with the user's
        weights from its `state` (initialised deterministically per user on first use)."""
        preset = self.encoder_of[user]
        if "encoder" not in state:
            with torch.random.fork_rng(devices=[]):
                rng.manual_seed(seeding.derive_seed(self.cfg.seed, "encoder", user))
                state["encoder"] = float_state(build_encoder(self.run, preset))
                state["head"] = float_state(build_head(self.run))
        if preset not in self._encoders:
            self._encoders[preset] = build_encoder(self.run, preset)
        load_float_state(self._encoders[preset], state["encoder"])
        load_float_state(self.head, state["head"])
        return self._encoders[preset], self.head

    def user_train(self, ctx: UserContext, payload: Payload) -> Payload:
        encoder, head = self.user_models(ctx.state, ctx.user)
        protos = payload.tensors.get("prototypes")
        present = payload.tensors.get("present")
        loss, sums, counts, opt_state = local_train_split(
            encoder, head, self.channel, ctx.x, ctx.y, self.cfg, split_snr(self.cfg, ctx), ctx.generator("batches"),
            user_lr(self.cfg, ctx.user), ctx.state.get("opt"),
            centroids=None if protos is None else protos.to(ctx.device),
            present=None if present is None else present.to(ctx.device), lam=self.options.lam, mse=True,
            num_classes=self.run.spec.num_classes)
        ctx.state.update(encoder=float_state(encoder), head=float_state(head), opt=opt_state)
        held = torch.nonzero(counts > 0).flatten()
        return Payload({"prototypes": (sums[held] / counts[held, None]).float(), "classes": held.long(),
                        "counts": counts[held].long()}, codec="dense", meta={"loss": loss})

    def run_round(self, round_: int, users: list[int]) -> dict[str, Any]:
        request = Payload() if self.prototypes is None else Payload(
            {"prototypes": self.prototypes, "present": self.present}, codec="dense")
        replies, losses = [], {}

        def collect(user: int, reply: Payload) -> None:
            replies.append((reply.tensors["prototypes"], reply.tensors["classes"], reply.tensors["counts"]))
            losses[user] = reply.meta["loss"]

        self.transport.send(users, "train", request, on_reply=collect)
        self.prototypes, self.present = average_prototypes(replies, self.run.spec.num_classes, self.options.weighted)
        self.prototypes = self.prototypes.to(self.run.device)
        return {"user_rows": [{"user": k, "train_loss": v, "encoder": self.encoder_of[k]} for k, v in losses.items()],
                "train_loss": sum(losses.values()) / len(losses)}

    def evaluate(self, round_: int) -> list[dict[str, Any]]:
        rows = []
        protos = None
        if self.prototypes is not None:  # classes no user holds are moved far away: never the nearest
            protos = self.prototypes.masked_fill(~self.present.to(self.prototypes.device)[:, None], 1e6)
        for user in range(self.cfg.users):
            state = self.fetched_state(user)
            if state is None:
                continue
            encoder, head = self.user_models(state, user)
            r = evaluate_split(encoder, head, self.channel, *user_test_set(self.run, user), eval_snr(self.cfg),
                               self.cfg.eval.batch_size, protos)
            rows.append({"scope": "user", "user": user, "encoder": self.encoder_of[user], **r})
        keys = [k for k in ("loss", "accuracy", "proto_accuracy") if k in rows[0]]
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
        return [{"scope": "global", **mean, "eval_snr_db": eval_snr(self.cfg)}] + rows

    def fetched_state(self, user: int) -> dict | None:
        """A copy of the user's encoder and head weights, fetched from the user for evaluation
        (None when its node did not answer)."""
        state = self.transport.fetch_state(user, ["encoder", "head"])
        return None if state is None else dict(state)

    def state_dict(self) -> dict[str, Any]:
        return {"prototypes": self.prototypes, "present": self.present}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prototypes, self.present = state["prototypes"], state["present"]

    def finish(self, out_dir) -> dict[str, Any]:
        pairs = {}
        for user in range(self.cfg.users):
            state = self.fetched_state(user)
            if state is None:
                continue
            encoder, head = build_encoder(self.run, self.encoder_of[user]), build_head(self.run)
            self.user_models(state, user)
            load_float_state(encoder, state["encoder"])
            load_float_state(head, state["head"])
            pairs[user] = (encoder, head)
        return finish_split(self.run, "FedProto", pairs, self.channel, out_dir)
