"""FedCL (Wang et al., "Federated contrastive learning for personalized semantic communication"):
split learning of personalised user encoders and one base-station classifier head, with a semantic
centroid generator (SCG) trained contrastively on the users' class centroids.

One round (Algorithm 1), for each participating user k in turn:
  the base station starts user k's head copy phi_k from the global head phi;
  the user sends received noisy features f_hat (eqs 1-2; power-normalised 32 complex symbols
  through the channel at its training SNR) and labels, `fedcl.batches_per_message` mini-batches per
  message (payload: features float32 + labels int64, dense);
  the base station takes those mini-batches one by one in order: loss eq 10 (CE + lam *
  ||f_hat - F^y||^2 with the current global centroids F), one SGD step on phi_k (eq 4), and the
  gradient of that mini-batch's loss w.r.t. its received features; it adds the local centroid sums
  (eq 7) and sends the gradients back over the noisy downlink;
  the user back-propagates each mini-batch's gradient through the channel and its encoder and takes
  one optimiser step per mini-batch, in order, with its own learning rate (eq 6).
Then the SCG takes `fedcl.scg_steps` steps on eqs 8-9 with the round's local centroids, and the
heads are averaged by data size (eq 5).

Batching (documented choice). With B = `batches_per_message` mini-batches per message, the user
computes the features of all B mini-batches with the encoder weights theta it has when the message
leaves; the base station still updates phi once per mini-batch, in order, exactly as with
per-batch exchange; the user computes the B parameter gradients at that same theta (the stored
forward graphs) and applies them as B successive optimiser steps. For B = 1 this is exactly
per-batch split learning; for B > 1 the encoder side is the usual "delayed (stale) encoder update"
approximation: the features/gradients of mini-batch j were computed with theta from the start of
the message rather than after mini-batch j-1's step.

Downlink noise. The gradients cross the downlink as analogue values: each mini-batch's gradient
matrix g gets i.i.d. Gaussian noise of variance mean(g^2) / 10^(downlink_snr_db / 10)
(`fedcl.downlink_snr_db`, inf = noiseless); the link is charged 32 bits per gradient entry. The
noise of a gradients message is drawn from its own generator, seeded by (run seed, round, user,
"downlink", message index) and drawn on the CPU, never from the global RNG: its draws do not depend
on what the user handlers (which run in the same process with the local transport, in other
processes on a Flower deployment) did to the global generator, nor on the device.
Back-propagation through the channel uses the channel realisation of the uplink (the identity
Jacobian for AWGN; for Rayleigh the base station's channel estimate that it equalises with).

The base station never sees a user's encoder; its evaluation here reads the users' encoders from
their state (the simulation's shortcut for "each user evaluates its encoder with the global head").
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F

from semfl.wireless.channel import make_channel
from semfl.wireless.codecs import Payload
from semfl.protocol.method import Method, register_method
from semfl.methods.split.common import assign_encoders, encoders_name, split_objective, build_encoder, build_head, eval_snr, evaluate_split, finish_split, float_state, load_float_state, split_snr, task_loss, user_lr, user_test_set
from semfl.models.split import SCG, scg_loss, transmit
from semfl import rng
from semfl.protocol import seeding
from semfl.protocol.context import UserContext
from semfl.training import RunningAverage, batches, make_optimizer


def downlink_noise(g: torch.Tensor, snr_db: float, generator: torch.Generator) -> torch.Tensor:
    """g + N(0, mean(g^2) / 10^(snr/10)) per entry, the noise drawn from ``generator`` (a CPU
    generator); g unchanged for an infinite SNR (+inf; -inf and NaN are config errors)."""
    if snr_db == math.inf:
        return g
    std = (g.pow(2).mean() / 10 ** (snr_db / 10)).sqrt()
    noise = torch.randn(g.shape, generator=generator, dtype=g.dtype, device=generator.device)
    return g + std * noise.to(g.device)


def downlink_generator(seed: int, round_: int, user: int, message: int) -> torch.Generator:
    """The generator of the downlink noise of gradients message ``message`` (0, 1, ...) of a user's round."""
    return seeding.generator(seed, round_, user, "downlink", message)


def local_centroids(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq 7: the class means of the received features from per-class sums (..., C, d) and counts
    (..., C); returns (means, present = counts > 0). Absent classes get zero vectors."""
    return sums / counts.clamp_min(1).unsqueeze(-1), counts > 0


def batch_sizes(num_samples: int, batch_size: int, epochs: int) -> list[int]:
    """Mini-batch sizes of one round, as `training.batches` draws them (last batch of an epoch smaller)."""
    full, rest = divmod(num_samples, batch_size)
    per_epoch = [batch_size] * full + ([rest] if rest else [])
    return per_epoch * epochs


@register_method
class FedCL(Method):
    name = "fedcl"
    tables = ("fedcl",)
    precisions = ("fp32",)  # split learning: features and gradients cross the link in fp32

    @classmethod
    def model_name(cls, cfg) -> str:
        return encoders_name(cfg.table("fedcl"))

    @classmethod
    def objective(cls, cfg):
        """Eq 10 at the base station's head and through the users' encoders, CE + lam * squared distance
        to the SCG's centroid of the class; the head at fedcl.head_lr, the SCG by its own loss and Adam."""
        o = cfg.table("fedcl")
        head = (f"head lr {o.head_lr:g}",) if o.head_lr else ()
        return split_objective(cfg, f"{o.lam:g}*||f_hat - SCG centroid of its class||^2", *head,
                               f"SCG: contrastive loss, adam lr={o.scg_lr:g}")

    def __init__(self, run, transport):
        super().__init__(run, transport)
        self.options = self.cfg.table("fedcl")
        self.channel = make_channel(self.cfg.channel)
        self.encoder_of = assign_encoders(run.user_sizes, self.options)
        self._encoders: dict[str, torch.nn.Module] = {}  # one working encoder per preset
        self.head = build_head(run)  # the one working head
        self.global_head = float_state(self.head)
        self.scg = SCG(run.spec.num_classes, self.options.scg_input, self.options.scg_hidden,
                       generator=seeding.generator(self.cfg.seed, "scg")).to(run.device)
        self.scg_opt = torch.optim.Adam(self.scg.parameters(), lr=self.options.scg_lr)
        self.centroids = self.generate().detach()
        run.log("encoders: " + ", ".join(f"u{k}={e}" for k, e in enumerate(self.encoder_of)))

    def generate(self) -> torch.Tensor:
        """Global centroids F = SCG(inputs), rescaled to `fedcl.centroid_norm` when that is > 0."""
        centroids = self.scg()
        if self.options.centroid_norm > 0:
            centroids = self.options.centroid_norm * F.normalize(centroids, dim=1)
        return centroids

    # ---------------------------------------------------------------- users
    def handlers(self):
        return {"step": self.user_step}

    def encoder_state(self, state: dict, user: int) -> dict[str, torch.Tensor]:
        """A user's encoder weights from its state, initialised (deterministically per user) on first use."""
        if "encoder" not in state:
            with torch.random.fork_rng(devices=[]):
                rng.manual_seed(seeding.derive_seed(self.cfg.seed, "encoder", user))
                state["encoder"] = float_state(build_encoder(self.run, self.encoder_of[user]))
        return state["encoder"]

    def working_encoder(self, user: int, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        preset = self.encoder_of[user]
        if preset not in self._encoders:
            self._encoders[preset] = build_encoder(self.run, preset)
        load_float_state(self._encoders[preset], weights)
        return self._encoders[preset]

    def round_batches(self, ctx: UserContext) -> list[torch.Tensor]:
        gen = ctx.generator("batches")  # same seed for every message of the round: the same plan
        return [idx for _ in range(self.cfg.train.local_epochs)
                for idx in batches(ctx.num_samples, self.cfg.train.batch_size, gen)]

    def forward_chunk(self, ctx: UserContext, encoder, plan, start: int, stop: int) -> list[torch.Tensor]:
        """The noisy features of mini-batches plan[start:stop]; the channel noise is seeded by the
        chunk's position, so the gradients message can recompute exactly the same graphs."""
        seeding.enter(ctx.seed, "message", start)
        encoder.train()
        snr = split_snr(self.cfg, ctx)
        return [transmit(encoder(ctx.x[idx]), self.channel, snr) for idx in plan[start:stop]]

    def user_step(self, ctx: UserContext, payload: Payload) -> Payload:
        """Apply the gradients of the previous message (if any), then send the next features (if any).

        Between messages the user keeps only its weights and its position in the round's batch plan,
        not autograd graphs: the gradients message recomputes the chunk's forward pass from the same
        weights (BatchNorm statistics included) and noise seed. That costs one extra forward pass
        per chunk and lets a user's node serve each message in a fresh process (Flower deployment)."""
        state = ctx.state
        plan = self.round_batches(ctx)
        cursor = state.get("cursor", 0) if state.get("cursor_round") == ctx.round else 0
        if "gradients" in payload.tensors:
            start = state["chunk_start"]
            encoder = self.working_encoder(ctx.user, self.encoder_state(state, ctx.user))
            self.apply_gradients(ctx, encoder, self.forward_chunk(ctx, encoder, plan, start, cursor),
                                 payload.tensors["gradients"])
        if cursor >= len(plan):
            return Payload()  # round done: empty reply
        encoder = self.working_encoder(ctx.user, self.encoder_state(state, ctx.user))
        stop = cursor + self.options.batches_per_message
        with torch.no_grad():
            features = self.forward_chunk(ctx, encoder, plan, cursor, stop)
        state["chunk_start"], state["cursor"], state["cursor_round"] = cursor, min(stop, len(plan)), ctx.round
        return Payload({"features": torch.cat(features).float(),
                        "labels": torch.cat([ctx.y[idx] for idx in plan[cursor:stop]]).long()}, codec="dense")

    def apply_gradients(self, ctx: UserContext, encoder: torch.nn.Module, pending: list[torch.Tensor],
                        gradients: torch.Tensor) -> None:
        params = list(encoder.parameters())
        grads = gradients.to(ctx.device).split([len(f) for f in pending])
        # all B parameter gradients at the message's theta first (the graphs hold theta), then B steps
        per_batch = [torch.autograd.grad(f, params, g) for f, g in zip(pending, grads)]
        opt = make_optimizer(params, self.cfg.train, lr=user_lr(self.cfg, ctx.user))
        if "opt" in ctx.state:
            opt.load_state_dict(ctx.state["opt"])
        for gs in per_batch:
            for p, gp in zip(params, gs):
                p.grad = gp
            opt.step()
        ctx.state["opt"] = opt.state_dict()
        ctx.state["encoder"] = float_state(encoder)

    # ---------------------------------------------------------------- base station
    def server_batches(self, features, labels, sizes, opt, sums, counts,
                       generator: torch.Generator) -> tuple[torch.Tensor, list[float]]:
        """SGD on the head, one mini-batch at a time in order; returns d loss / d f_hat per mini-batch,
        with the downlink noise drawn from ``generator`` (one per message, see `downlink_generator`)."""
        self.head.train()
        out, losses = [], []
        present = torch.ones(len(self.centroids), dtype=torch.bool, device=features.device)
        for f, y in zip(features.split(sizes), labels.split(sizes)):
            f = f.detach().requires_grad_(True)
            loss, _ = task_loss(self.head(f), y, f, self.centroids, present, self.options.lam)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            out.append(downlink_noise(f.grad.detach(), self.options.downlink_snr_db, generator))
            losses.append(float(loss.detach()) * len(y))
            sums.index_add_(0, y, f.detach())
            counts += torch.bincount(y, minlength=len(counts)).to(counts.dtype)
        return torch.cat(out), losses

    def train_user(self, user: int, sums: torch.Tensor, counts: torch.Tensor, round_: int) -> float | None:
        """All messages with one user in round ``round_``; leaves its updated head phi_k in the working head."""
        load_float_state(self.head, self.global_head)
        opt = make_optimizer(self.head.parameters(), self.cfg.train, lr=self.options.head_lr or self.cfg.train.lr)
        sizes = batch_sizes(self.run.user_sizes[user], self.cfg.train.batch_size, self.cfg.train.local_epochs)
        request, total, n, message = Payload(), 0.0, 0, 0
        while True:
            reply = self.transport.send([user], "step", request).get(user)
            if reply is None:  # the user dropped out (Flower): its partial head and centroids are discarded
                return None
            if "features" not in reply.tensors:
                return total / max(n, 1)
            labels = reply.tensors["labels"]
            take = []
            while sum(take) < len(labels):
                take.append(sizes.pop(0))
            grads, losses = self.server_batches(reply.tensors["features"], labels, take, opt, sums, counts,
                                                downlink_generator(self.cfg.seed, round_, user, message))
            total, n, message = total + sum(losses), n + len(labels), message + 1
            request = Payload({"gradients": grads.float()}, codec="dense")

    def run_round(self, round_: int, users: list[int]) -> dict[str, Any]:
        classes, dim = self.centroids.shape
        sums = torch.zeros(len(users), classes, dim, device=self.run.device)
        counts = torch.zeros(len(users), classes, device=self.run.device)
        average = RunningAverage()
        user_rows = []
        for i, user in enumerate(users):
            loss = self.train_user(user, sums[i], counts[i], round_)
            if loss is None:
                sums[i].zero_()
                counts[i].zero_()
                continue
            average.add(float_state(self.head), self.run.user_sizes[user])  # eq 5 weights D_k / D
            user_rows.append({"user": user, "train_loss": loss, "encoder": self.encoder_of[user]})
        self.global_head = average.result(self.global_head)
        scg_value = self.update_scg(*local_centroids(sums, counts))
        return {"user_rows": user_rows, "train_loss": sum(r["train_loss"] for r in user_rows) / max(len(user_rows), 1),
                "scg_loss": scg_value, "centroid_norm": float(self.centroids.norm(dim=1).mean())}

    def update_scg(self, local_centroids: torch.Tensor, present: torch.Tensor) -> float:
        """Eq 8: `scg_steps` Adam steps on sum_c L_F^c (eq 9); returns the loss before the first step."""
        first = None
        for _ in range(self.options.scg_steps):
            loss = scg_loss(local_centroids, present, self.generate())
            first = float(loss.detach()) if first is None else first
            self.scg_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.scg_opt.step()
        self.centroids = self.generate().detach()
        return first if first is not None else float(scg_loss(local_centroids, present, self.centroids))

    # ---------------------------------------------------------------- evaluation and state
    def user_encoder(self, user: int) -> dict[str, torch.Tensor] | None:
        """A user's current encoder weights, fetched from the user (the initial ones before it trains);
        None when the user's node did not answer."""
        state = self.transport.fetch_state(user, ["encoder"])
        return None if state is None else self.encoder_state(dict(state), user)

    def evaluate(self, round_: int) -> list[dict[str, Any]]:
        load_float_state(self.head, self.global_head)
        rows = []
        for user in range(self.cfg.users):
            weights = self.user_encoder(user)
            if weights is None:
                continue
            encoder = self.working_encoder(user, weights)
            r = evaluate_split(encoder, self.head, self.channel, *user_test_set(self.run, user),
                               eval_snr(self.cfg), self.cfg.eval.batch_size)
            rows.append({"scope": "user", "user": user, "encoder": self.encoder_of[user], **r})
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("loss", "accuracy")}
        return [{"scope": "global", **mean, "eval_snr_db": eval_snr(self.cfg)}] + rows

    def state_dict(self) -> dict[str, Any]:
        return {"global_head": self.global_head, "scg": self.scg.state_dict(), "scg_opt": self.scg_opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_head = state["global_head"]
        self.scg.load_state_dict(state["scg"])
        self.scg_opt.load_state_dict(state["scg_opt"])
        self.centroids = self.generate().detach()

    @classmethod
    def trained_models(cls, run, state, user_state):
        """"user:K": user K's encoder -> channel -> the global head (a classifier: there is no
        global encoder, and no decoder of images)."""
        from semfl.models.split import SplitClassifier

        encoder_of = assign_encoders(run.user_sizes, run.cfg.table("fedcl"))

        def user(k: int):
            def build():
                held = user_state(k, ["encoder"])
                if not held or "encoder" not in held:
                    raise LookupError(f"user {k} holds no encoder in this checkpoint (it has not trained yet)")
                encoder, head = build_encoder(run, encoder_of[k]), build_head(run)
                load_float_state(encoder, held["encoder"])
                load_float_state(head, state["global_head"])
                return SplitClassifier(encoder, head, make_channel(run.cfg.channel)).to(run.device)
            return build
        return {f"user:{k}": user(k) for k in range(run.cfg.users)}

    def finish(self, out_dir) -> dict[str, Any]:
        head = build_head(self.run)
        load_float_state(head, self.global_head)
        pairs = {}
        for user in range(self.cfg.users):
            weights = self.user_encoder(user)
            if weights is not None:
                pairs[user] = (build_encoder(self.run, self.encoder_of[user]), head)
                load_float_state(pairs[user][0], weights)
        return finish_split(self.run, "FedCL", pairs, self.channel, out_dir)
