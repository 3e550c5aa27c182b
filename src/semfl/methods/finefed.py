"""FineFed (Wu, Li, Xu, Chen, Zhu, "Personalized federated learning for semantic communication with
collaborative fine-tuning"): a federated semantic model, then pair-wise fine-tuning of personal
encoders (senders) and decoders (receivers).

Stage 1, rounds 1..F (``finefed.fedavg_rounds``): FedAvg on the whole model (the fedavg handlers).
Stage 2 starts with one broadcast of the federated model; every user keeps its sender half E_i and
its receiver half D_i (the model's ``sender_prefixes`` / ``receiver_prefixes``). User i sends to the
receivers R(i) = {(i + K//2 + m) mod K : m < finefed.receivers}, skipping i (10 users, 2 receivers:
{i+5, i+6}, the authors' code); each pair (i, j) has its own data: sender i's samples split into
|R(i)| interleaved shards, one per receiver. Each stage-2 round is one phase of each kind:

Encoder phase (receivers' decoders fixed; multi-task over receivers). For each sender i, message by
message (``finefed.batches_per_message`` mini-batches of every pair per message), i sends the
received symbols Y = channel(E_i(x)) and the images x of each pair; the base station relays them to
receiver j, which returns dMSE(D_j(Y), x)/dY per mini-batch; relayed back, i sums its pairs'
gradients of each mini-batch and takes one Adam step per mini-batch (``finefed.lr``). With more
than one mini-batch per message the gradients of a message are all taken at the encoder weights it
was sent with (the stale-update approximation FedCL documents too); with 1 it is exact.
Decoder phase (senders' encoders fixed; federated multi-task). For each receiver j, every sender i
with j in R(i) sends Y and x of its pair's shard, train.local_epochs noisy copies; j fine-tunes D_j
on the union of its senders' samples, train.local_epochs epochs of Adam.

Documented choices. There is no device-to-device link in the system model, so every hop goes
through the base station and is charged twice (uplink, then downlink). The receiver needs the
images to compute the reconstruction loss (the authors' code gives both ends of a pair its data):
here they cross the link as 8-bit pixels, and the link counts them. The channel of a pair is
simulated at the sender, at the sender's training SNR (its link SNR, channel.snr_db, or a value
drawn per sample from ``finefed.train_snrs``: the code's {1, 4, 7, 10, 13} dB).
Evaluation of stage 2: every pair (i, j) is tested as E_i -> channel -> D_j on the test set at
eval.snr_db; a user's row averages its pairs as sender; the global row averages all pairs and
gives the federated model's PSNR on the same images (``federated_psnr_db``) next to it.
Two PSNRs: ``psnr_db`` (and ``federated_psnr_db``, ``psnr_gain_pct``) is the mean of per-image PSNR,
as for every other method; ``psnr_batch_db`` (``federated_psnr_batch_db``, ``psnr_batch_gain_pct``)
is the paper's: 10 log10(255^2 / MSE) on the 0-255 scale, the MSE taken over the whole test set
(= 10 log10(1 / MSE) on the [0, 1] images; 100 dB at most, as the per-image PSNR). Pair rows average
their pairs' values of both. MS-SSIM, the paper's other metric, is not computed (``ssim`` is SSIM).
A user whose state cannot be fetched (a Flower node gone) is left out of the evaluation; when no
user answers, the global row holds the federated model's metrics only, with ``pairs`` = 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from semfl.wireless.codecs import Payload
from semfl.config import ConfigError, option, register_table
from semfl.protocol.method import register_method
from semfl.methods.common import build_semantic_model, finish_semantic, train_snr
from semfl.methods.fedavg import FedAvg
from semfl.protocol import seeding
from semfl.protocol.context import UserContext
from semfl.training import batches, evaluate_semantic, load_weights, snr_tensor, weights_of


@dataclass
class FineFedOptions:
    fedavg_rounds: int = option(0, "stage 1 length F; 0 = half of the rounds (at least 1)")
    receivers: int = option(2, "|R(i)|, 1..users - 1")
    lr: float = option(1e-4, "Adam, both phases (the authors' code)")
    batches_per_message: int = option(8, "encoder phase: mini-batches of every pair per message (1 = exact)")
    train_snrs: list[float] = option(factory=list, doc="per-sample training SNRs drawn from these; empty = channel.train_snr")

    def validate(self, cfg) -> None:
        if self.fedavg_rounds < 0 or self.fedavg_rounds > cfg.rounds:
            raise ConfigError(f"finefed.fedavg_rounds: must be in 0..rounds ({cfg.rounds}), got {self.fedavg_rounds}")
        if cfg.users < 2:
            raise ConfigError(f"users: finefed needs at least 2 users (senders and receivers), got {cfg.users}")
        if self.receivers < 1:
            raise ConfigError(f"finefed.receivers: must be >= 1, got {self.receivers}")
        if self.receivers > cfg.users - 1:
            raise ConfigError(f"finefed.receivers: must be at most users - 1 ({cfg.users - 1}: a user never "
                              f"sends to itself), got {self.receivers}")
        if self.lr <= 0:
            raise ConfigError(f"finefed.lr: must be > 0, got {self.lr}")
        if self.batches_per_message < 1:
            raise ConfigError(f"finefed.batches_per_message: must be >= 1, got {self.batches_per_message}")


register_table("finefed", FineFedOptions)


def stage_one_rounds(cfg) -> int:
    return cfg.table("finefed").fedavg_rounds or max(1, cfg.rounds // 2)


def receivers_of(user: int, users: int, count: int) -> list[int]:
    """R(user): the next ``count`` users from user + users // 2 on, cyclically, never user itself."""
    out: list[int] = []
    for m in range(users):
        j = (user + users // 2 + m) % users
        if j != user and len(out) < min(count, users - 1):
            out.append(j)
    return out


def senders_of(receiver: int, users: int, count: int) -> list[int]:
    return [i for i in range(users) if receiver in receivers_of(i, users, count)]


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().to(torch.uint8).cpu()


def from_pixels(pixels: torch.Tensor, device) -> torch.Tensor:
    return pixels.to(device).float() / 255


MAX_PSNR_DB = 100.0  # the cap of the per-image PSNR too (identical images)


def whole_set_psnr_db(mse: float) -> float:
    """The paper's PSNR: 10 log10(1 / MSE) of the MSE over the whole test set ([0, 1] images, so
    10 log10(255^2 / MSE) on the 0-255 scale); evaluate_semantic's ``mse`` is that MSE."""
    return MAX_PSNR_DB if mse <= 0 else min(MAX_PSNR_DB, 10 * math.log10(1 / mse))


@register_method
class FineFed(FedAvg):
    name = "finefed"
    tables = FedAvg.tables + ("finefed",)
    precisions = ("fp32",)  # symbols and their gradients cross the relay in fp32

    def __init__(self, run, transport):
        super().__init__(run, transport)
        if not hasattr(self.model, "sender_prefixes"):  # which parameters are whose half
            raise ConfigError(f"model.arch: finefed splits the model into a sender and a receiver half, which "
                              f"{self.cfg.model.arch!r} does not offer (use jscc or csc)")
        self.options = self.cfg.table("finefed")
        self.stage_one = stage_one_rounds(self.cfg)
        self.personalised = False
        k, r = self.cfg.users, self.options.receivers
        self.receivers = {i: receivers_of(i, k, r) for i in range(k)}
        self.senders = {j: senders_of(j, k, r) for j in range(k)}

    # ---------------------------------------------------------------- the two halves
    def prefixes(self, role: str) -> tuple[str, ...]:
        return self.model.sender_prefixes if role == "sender" else self.model.receiver_prefixes

    def half_params(self, role: str) -> list[torch.nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if n.startswith(self.prefixes(role))]

    def half_weights(self, weights: dict, role: str) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in weights.items() if k.startswith(self.prefixes(role))}

    def load_half(self, state: dict, role: str) -> list[torch.nn.Parameter]:
        if role not in state:
            raise RuntimeError(f"finefed: this user has no personal {role} model (it missed stage 2's first message)")
        load_weights(self.model, state[role])
        self.model.train()
        return self.half_params(role)

    def optimizer(self, state: dict, role: str, params: list) -> torch.optim.Adam:
        """The half's Adam, with the optimiser state the user keeps between rounds."""
        opt = torch.optim.Adam(params, lr=self.options.lr)
        if f"{role}_opt" in state:
            opt.load_state_dict(state[f"{role}_opt"])
        return opt

    def keep(self, state: dict, role: str, opt: torch.optim.Adam) -> None:
        """Store the trained half and its optimiser state in the user's state."""
        state[f"{role}_opt"] = opt.state_dict()
        state[role] = self.half_weights(dict(self.model.named_parameters()), role)

    def adam_step(self, state: dict, role: str, params: list, grads: list[list[torch.Tensor]]) -> None:
        """One Adam step per gradient list, in order."""
        opt = self.optimizer(state, role, params)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g
            opt.step()
        self.keep(state, role, opt)

    def received(self, ctx: UserContext, images: torch.Tensor, *purpose) -> torch.Tensor:
        """Y = channel(E(images)) as reals (B, n, 2), at per-sample training SNRs; the noise is seeded by
        ``purpose`` so that a later message can rebuild the same graph."""
        seeding.enter(ctx.seed, *purpose)
        snrs = self.options.train_snrs
        if snrs:
            pick = torch.randint(len(snrs), (len(images),), generator=seeding.generator(ctx.seed, "snr", *purpose))
            snr = torch.tensor(snrs, dtype=torch.float32)[pick].to(images.device)
        else:
            snr = snr_tensor(train_snr(self.cfg, ctx), len(images), images.device)
        return torch.view_as_real(self.model.channel(self.model.transmit_symbols(images), snr))

    def pair_shard(self, ctx: UserContext, receiver: int) -> torch.Tensor:
        """Indices of the sender's samples that belong to its pair with ``receiver``."""
        mine = self.receivers[ctx.user]
        return torch.arange(mine.index(receiver), ctx.num_samples, len(mine), device=ctx.x.device)

    def pair_plans(self, ctx: UserContext, receivers: list[int]) -> dict[int, list[torch.Tensor]]:
        """Each pair's mini-batches of the round (the same plan for every message of the round)."""
        plans = {}
        for j in receivers:
            shard = self.pair_shard(ctx, j)
            gen = seeding.generator(ctx.seed, "plan", j)
            plans[j] = [shard[b] for _ in range(self.cfg.train.local_epochs) for b in batches(len(shard), self.cfg.train.batch_size, gen)]
        return plans

    # ---------------------------------------------------------------- user handlers
    def handlers(self):
        return {**super().handlers(), "personalise": self.user_personalise, "encode": self.user_encode,
                "grad": self.user_grad, "features": self.user_features, "decode": self.user_decode}

    def user_personalise(self, ctx: UserContext, payload: Payload) -> Payload:
        ctx.state["sender"] = self.half_weights(payload.tensors, "sender")
        ctx.state["receiver"] = self.half_weights(payload.tensors, "receiver")
        return Payload()

    def chunk(self, ctx, plans, start: int, stop: int) -> dict[int, list[torch.Tensor]]:
        return {j: [self.received(ctx, ctx.x[plan[s]], "chunk", j, s) for s in range(start, min(stop, len(plan)))]
                for j, plan in plans.items()}

    def user_encode(self, ctx: UserContext, payload: Payload) -> Payload:
        """Sender: apply the receivers' gradients of the previous message (if any), then send the next
        message's symbols and images (empty reply when the round's plan is done)."""
        state, receivers = ctx.state, list(payload.meta["receivers"])
        plans = self.pair_plans(ctx, receivers)
        steps = max(len(p) for p in plans.values())
        cursor = state.get("cursor", 0) if state.get("cursor_round") == ctx.round else 0
        if any(name.startswith("grad/") for name in payload.tensors):
            start = state["chunk_start"]
            params = self.load_half(state, "sender")
            pending = self.chunk(ctx, plans, start, cursor)  # the same graphs as the message sent
            split = {j: payload.tensors[f"grad/{j}"].split([len(y) for y in pending[j]])
                     for j in receivers if f"grad/{j}" in payload.tensors}
            grads = []
            for s in range(start, cursor):
                pairs = [(pending[j][s - start], split[j][s - start]) for j in split if s < len(plans[j])]
                outputs, gs = zip(*pairs)
                grads.append(torch.autograd.grad(outputs, params, [g.to(ctx.device) for g in gs]))
            self.adam_step(state, "sender", params, grads)
        if cursor >= steps:
            return Payload()
        self.load_half(state, "sender")
        stop = min(cursor + self.options.batches_per_message, steps)
        with torch.no_grad():
            ys = self.chunk(ctx, plans, cursor, stop)
        state["chunk_start"], state["cursor"], state["cursor_round"] = cursor, stop, ctx.round
        tensors, sizes = {}, {}
        for j in receivers:
            idx = plans[j][cursor:stop]
            if not idx:  # this pair's plan is shorter (a smaller shard): nothing in this message
                continue
            tensors[f"y/{j}"] = torch.cat(ys[j]).float()
            tensors[f"x/{j}"] = to_pixels(ctx.x[torch.cat(idx)])
            sizes[str(j)] = [len(i) for i in idx]
        return Payload(tensors, codec="dense", meta={"sizes": sizes})

    def user_grad(self, ctx: UserContext, payload: Payload) -> Payload:
        """Receiver, decoder fixed: dMSE(D_j(Y), x)/dY of each mini-batch of a sender's message."""
        self.load_half(ctx.state, "receiver")
        y = payload.tensors["y"].to(ctx.device).requires_grad_(True)
        x = from_pixels(payload.tensors["x"], ctx.device)
        sizes = payload.meta["sizes"]
        recon = self.model.reconstruct(torch.view_as_complex(y))
        total = sum(F.mse_loss(r, t) for r, t in zip(recon.split(sizes), x.split(sizes)))
        (g,) = torch.autograd.grad(total, y)
        return Payload({"g": g.detach()}, codec="dense", meta={"loss": float(total.detach()) / len(sizes)})

    @torch.no_grad()
    def user_features(self, ctx: UserContext, payload: Payload) -> Payload:
        """Sender, encoder fixed: Y of its whole pair shard with ``receiver``, one noisy copy per epoch."""
        self.load_half(ctx.state, "sender")
        j = int(payload.meta["receiver"])
        images = ctx.x[self.pair_shard(ctx, j)]
        if not len(images):  # fewer samples than receivers: this pair has none
            return Payload()
        chunk = self.cfg.eval.batch_size
        ys = [torch.cat([self.received(ctx, images[s:s + chunk], "features", j, e, s) for s in range(0, len(images), chunk)])
              for e in range(self.cfg.train.local_epochs)]
        return Payload({"y": torch.stack(ys).float(), "x": to_pixels(images)}, codec="dense")

    def user_decode(self, ctx: UserContext, payload: Payload) -> Payload:
        """Receiver, encoders fixed: train.local_epochs epochs of Adam on D_j over all its senders' samples."""
        params = self.load_half(ctx.state, "receiver")
        senders = sorted({name.split("/")[1] for name in payload.tensors}, key=int)
        x = torch.cat([from_pixels(payload.tensors[f"x/{i}"], ctx.device) for i in senders])
        gen = ctx.generator("batches")
        total, count, steps = 0.0, 0, 0
        opt = self.optimizer(ctx.state, "receiver", params)
        for e in range(self.cfg.train.local_epochs):
            y = torch.cat([payload.tensors[f"y/{i}"][e].to(ctx.device) for i in senders])
            for idx in batches(len(x), self.cfg.train.batch_size, gen):
                loss = F.mse_loss(self.model.reconstruct(torch.view_as_complex(y[idx].contiguous())), x[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, count, steps = total + float(loss.detach()) * len(idx), count + len(idx), steps + 1
        self.keep(ctx.state, "receiver", opt)
        return Payload(meta={"loss": total / max(count, 1), "steps": steps})

    # ---------------------------------------------------------------- base station
    def run_round(self, round_: int, users: list[int]) -> dict[str, Any]:
        if round_ <= self.stage_one:
            return {**super().run_round(round_, users), "stage": 1}
        if not self.personalised:  # stage 2's first message: the federated model, once, to everyone
            self.transport.send(range(self.cfg.users), "personalise", Payload(self.global_weights, codec="dense"))
            self.personalised = True
        active = set(users)
        rows = {u: {"user": u} for u in users}
        for i in users:
            pairs = [j for j in self.receivers[i] if j in active]
            if pairs:
                rows[i]["encoder_loss"] = self.encoder_phase(i, pairs)
        for j in users:
            rows[j]["decoder_loss"] = self.decoder_phase(j, [i for i in self.senders[j] if i in active])
        user_rows = [r for r in rows.values() if len(r) > 1]
        losses = [r[k] for r in user_rows for k in ("encoder_loss", "decoder_loss") if r.get(k) is not None]
        return {"user_rows": user_rows, "stage": 2, "train_loss": sum(losses) / max(len(losses), 1)}

    def encoder_phase(self, sender: int, pairs: list[int]) -> float | None:
        """All messages of one sender's encoder phase; returns the mean pair loss (None if it dropped out)."""
        request, losses = Payload(meta={"receivers": pairs}), []
        while True:
            reply = self.transport.send([sender], "encode", request).get(sender)
            if reply is None:
                return None
            if not reply.tensors:
                return sum(losses) / len(losses) if losses else None
            grads = {}
            for j in (j for j in pairs if f"y/{j}" in reply.tensors):
                relay = Payload({"y": reply.tensors[f"y/{j}"], "x": reply.tensors[f"x/{j}"]}, codec="dense",
                                meta={"sizes": reply.meta["sizes"][str(j)]})
                answer = self.transport.send([j], "grad", relay).get(j)
                # a receiver that did not answer contributes no gradient to this message
                grads[f"grad/{j}"] = torch.zeros_like(reply.tensors[f"y/{j}"]) if answer is None else answer.tensors["g"]
                if answer is not None:
                    losses.append(answer.meta["loss"])
            request = Payload(grads, codec="dense", meta={"receivers": pairs})

    def decoder_phase(self, receiver: int, senders: list[int]) -> float | None:
        tensors = {}
        for i in senders:
            reply = self.transport.send([i], "features", Payload(meta={"receiver": receiver})).get(i)
            if reply is not None and reply.tensors:
                tensors[f"y/{i}"], tensors[f"x/{i}"] = reply.tensors["y"], reply.tensors["x"]
        if not tensors:
            return None
        answer = self.transport.send([receiver], "decode", Payload(tensors, codec="dense")).get(receiver)
        return None if answer is None else answer.meta["loss"]

    # ---------------------------------------------------------------- evaluation and state
    def personal_halves(self) -> dict[int, dict[str, dict]]:
        """Every user's current sender and receiver halves, fetched from the users (None: no answer)."""
        out = {}
        for user in range(self.cfg.users):
            state = self.transport.fetch_state(user, ["sender", "receiver"])
            if state is not None and "sender" in state:
                out[user] = state
        return out

    def pair_weights(self, halves: dict, sender: int, receiver: int) -> dict[str, torch.Tensor]:
        return {**self.global_weights, **halves[sender]["sender"], **halves[receiver]["receiver"]}

    def evaluate_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """evaluate_semantic of the working model with these weights, plus the batch PSNR (psnr_batch_db)."""
        load_weights(self.model, weights)
        result = evaluate_semantic(self.model, self.run.classifier, self.run.test_x, self.run.test_y,
                                   self.cfg.eval.snr_db, self.cfg.eval.batch_size)
        return {**result, "psnr_batch_db": whole_set_psnr_db(result["mse"])}

    def evaluate(self, round_: int) -> list[dict[str, Any]]:
        fed = self.evaluate_weights(self.global_weights)  # the federated model (FedAvg's global row)
        if not self.personalised:
            return [{"scope": "global", **fed}]
        halves = self.personal_halves()
        keys = ("loss", "accuracy", "psnr_db", "ssim", "psnr_batch_db")
        rows, pair_results = [], []
        for i in range(self.cfg.users):
            pairs = [j for j in self.receivers[i] if i in halves and j in halves]
            results = [self.evaluate_weights(self.pair_weights(halves, i, j)) for j in pairs]
            if results:
                rows.append({"scope": "user", "user": i, "receivers": ",".join(map(str, pairs)),
                             **{k: sum(r[k] for r in results) / len(results) for k in keys}})
                pair_results += results
        federated = {"federated_psnr_db": fed["psnr_db"], "federated_psnr_batch_db": fed["psnr_batch_db"],
                     "federated_ssim": fed["ssim"], "federated_loss": fed["loss"]}
        if not pair_results:  # no pair with both ends reachable (Flower nodes gone): the federated model only
            self.run.log(f"finefed: round {round_}: no pair's personal halves could be fetched (users "
                         f"{sorted(set(range(self.cfg.users)) - set(halves))} did not answer or hold none); "
                         "the global row has the federated model's metrics only")
            return [{"scope": "global", "pairs": 0, **federated}]
        mean = {k: sum(r[k] for r in pair_results) / len(pair_results) for k in keys}
        return [{"scope": "global", **mean, "pairs": len(pair_results), **federated,
                 "psnr_gain_pct": 100 * (mean["psnr_db"] / fed["psnr_db"] - 1),
                 "psnr_batch_gain_pct": 100 * (mean["psnr_batch_db"] / fed["psnr_batch_db"] - 1)}] + rows

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "personalised": self.personalised}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.personalised = bool(state["personalised"])

    @classmethod
    def trained_models(cls, run, state, user_state):
        """"global" (the federated model) and, once personalised, "pair:I-J": sender I's encoder
        half with receiver J's decoder half, for every J in R(I)."""
        models = super().trained_models(run, state, user_state)
        if not state.get("personalised"):
            return models
        k, r = run.cfg.users, run.cfg.table("finefed").receivers

        def pair(i: int, j: int):
            def build():
                sender, receiver = user_state(i, ["sender"]), user_state(j, ["receiver"])
                if not sender or not receiver:
                    raise LookupError(f"users {i} and {j} hold no personal halves in this checkpoint")
                model = cls.build_global(run)
                load_weights(model, {**state["global_weights"], **sender["sender"], **receiver["receiver"]})
                return model
            return build

        models.update({f"pair:{i}-{j}": pair(i, j) for i in range(k) for j in receivers_of(i, k, r)})
        return models

    def finish(self, out_dir):
        models = {"federated": self.global_model()}
        halves = self.personal_halves() if self.personalised else {}
        if 0 in halves and self.receivers[0] and self.receivers[0][0] in halves:
            j = self.receivers[0][0]
            pair = build_semantic_model(self.run, self.cfg.model.arch)
            load_weights(pair, self.pair_weights(halves, 0, j))
            models[f"finefed u0->u{j}"] = pair
        return finish_semantic(self.run, models, out_dir)
