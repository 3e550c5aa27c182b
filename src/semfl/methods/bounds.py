"""The bounds of a federated comparison: ``centralised`` (the ceiling) and ``local`` (the floor).

Both train FedAvg's semantic model (``model.arch``, the same initial weights, the same start from the
foundation with ``foundation.global_model``) on the same objective as the FedAvg family
(``training.reconstruction_loss``: mse + train.task_weight * CE, train.optimizer at train.lr, a fresh
optimiser each round as every user's local training has), and both talk through the transport, so
the link records what they cost.

centralised: every user uploads its data to the base station once, the first round it takes part,
as a dense payload of its raw images (8-bit pixels, the dataset's own precision: 8 bits per pixel
and channel) and 8-bit labels; that upload is its whole link cost. Each round the base station then
trains on the pooled data of the round's participants for ``train.local_epochs`` epochs: the same
number of sample visits as a FedAvg round, in one model. Every sample is seen at its owner's
training SNR of the round (the channel inside the model is the user's, as in FedAvg).

local: each user receives the initial model once (dense, as FedAvg's first broadcast) and then
trains alone, round after round, keeping its model in its own state; it sends back only its
sample count and training loss. The global metrics are the mean over users of each user's model
on the test set (each user's row holds its own); the base station reads the users' models for
that evaluation with ``fetch_state`` (instrumentation, not charged to the link).
"""
from __future__ import annotations

from typing import Any

import torch

from semfl.wireless.codecs import Payload
from semfl.protocol.method import register_method
from semfl.methods.common import train_snr
from semfl.methods.fedavg import FedAvg
from semfl.protocol import seeding
from semfl.protocol.context import UserContext
from semfl.training import evaluate_semantic, load_weights, local_train, weights_of

EVAL_KEYS = ("loss", "accuracy", "psnr_db", "ssim", "mse", "ce")


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the 8-bit pixels they were loaded from (exact: loading divided by 255)."""
    pixels = (x * 255).round().clamp(0, 255).to(torch.uint8)
    if not torch.equal(pixels.to(x.dtype) / 255, x):
        raise ValueError("centralised: the user's images are not 8-bit pixels / 255; cannot upload them as pixels")
    return pixels


@register_method
class Centralised(FedAvg):
    """All users' data pooled at the base station; one model trained there (the ceiling)."""

    name = "centralised"
    tables = ("foundation",)  # nothing is aggregated

    def __init__(self, run, transport):
        super().__init__(run, transport)
        self.pool: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # user -> (uint8 pixels, uint8 labels), CPU

    def handlers(self):
        return {"upload": self.user_upload}

    def user_upload(self, ctx: UserContext, payload: Payload) -> Payload:
        tensors = {"pixels": to_pixels(ctx.x).cpu(), "labels": ctx.y.to(torch.uint8).cpu()}
        return Payload(tensors, codec="dense", meta={"num_samples": ctx.num_samples})

    def run_round(self, round_: int, users: list[int]) -> dict[str, Any]:
        new = [u for u in users if u not in self.pool]
        if new:
            replies = self.transport.send(new, "upload", Payload({}, codec="dense"))
            for user, reply in replies.items():
                self.pool[user] = (reply.tensors["pixels"], reply.tensors["labels"])
        present = [u for u in users if u in self.pool]
        device = self.run.device
        x = torch.cat([self.pool[u][0] for u in present]).to(device).float() / 255
        y = torch.cat([self.pool[u][1] for u in present]).to(device).long()
        snr = torch.cat([torch.full((len(self.pool[u][1]),), self.owner_snr(round_, u)) for u in present]).to(device)
        load_weights(self.model, self.global_weights)
        # the channel noise of the base station's training: its own stream, not whatever the last
        # user's handler left in the global generators (which differs with engine.workers > 1)
        seeding.enter(self.cfg.seed, round_, "centralised-train")
        loss = local_train(self.model, x, y, self.cfg.train, snr, self.run.classifier,
                           seeding.generator(self.cfg.seed, round_, "centralised"))
        self.global_weights = weights_of(self.model)
        return {"train_loss": loss, "pooled_samples": len(y), "uploads": len(new)}

    def owner_snr(self, round_: int, user: int) -> float:
        """The channel SNR the user would train at this round (methods.common.train_snr)."""
        return self.run.link.snr_db(round_, user) if self.cfg.channel.train_snr == "link" else self.cfg.channel.snr_db

    def state_dict(self) -> dict[str, Any]:
        return {"global_weights": self.global_weights, "pool": dict(self.pool)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_weights = state["global_weights"]
        self.pool = {int(u): tuple(v) for u, v in state["pool"].items()}


@register_method
class Local(FedAvg):
    """Each user trains alone from the initial model, no exchange (the floor)."""

    name = "local"
    tables = ("foundation",)  # nothing is aggregated

    def __init__(self, run, transport):
        super().__init__(run, transport)
        self.started: set[int] = set()  # users that hold their own model

    def handlers(self):
        return {"train": self.user_train}

    def user_train(self, ctx: UserContext, payload: Payload) -> Payload:
        weights = payload.tensors if payload.tensors else ctx.state["weights"]
        load_weights(self.model, weights)
        loss = local_train(self.model, ctx.x, ctx.y, self.cfg.train, train_snr(self.cfg, ctx),
                           self.run.classifier, ctx.generator("batches"))
        ctx.state["weights"] = {k: v.cpu() for k, v in weights_of(self.model).items()}
        return Payload({}, codec="dense", meta={"num_samples": ctx.num_samples, "loss": loss})

    def run_round(self, round_: int, users: list[int]) -> dict[str, Any]:
        requests = {u: Payload({}, codec="dense") if u in self.started else Payload(self.global_weights, codec="dense")
                    for u in users}
        replies = self.transport.send(users, "train", requests)
        self.started.update(users)
        return {"user_rows": [{"user": u, "train_loss": r.meta["loss"]} for u, r in replies.items()]}

    def user_weights(self, user: int) -> dict[str, torch.Tensor]:
        """A user's own model (the initial one until it first trains)."""
        if user not in self.started:
            return self.global_weights
        state = self.transport.fetch_state(user, ["weights"]) or {}
        if "weights" not in state:
            raise RuntimeError(f"local: user {user} holds no model to evaluate")
        return {k: v.to(self.run.device) for k, v in state["weights"].items()}

    def evaluate(self, round_: int) -> list[dict[str, Any]]:
        rows, initial = [], None
        for user in range(self.cfg.users):
            if user not in self.started and initial is not None:
                result = initial  # every user that has not trained yet holds the same initial model
            else:
                load_weights(self.model, self.user_weights(user))
                result = evaluate_semantic(self.model, self.run.classifier, self.run.test_x, self.run.test_y,
                                           self.cfg.eval.snr_db, self.cfg.eval.batch_size)
                if user not in self.started:
                    initial = result
            rows.append({"scope": "user", "user": user, **{k: result[k] for k in EVAL_KEYS}})
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in EVAL_KEYS}
        return [{"scope": "global", **mean, "aggregate": "mean over users' own models"}] + rows

    def state_dict(self) -> dict[str, Any]:
        return {"global_weights": self.global_weights, "started": sorted(self.started)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_weights = state["global_weights"]
        self.started = {int(u) for u in state["started"]}

    def finish(self, out_dir):
        return {}  # no single model to sweep or draw: the users' models stay with the users
