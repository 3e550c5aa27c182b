"""FedSFR ("Federated learning enhanced by feature reconstruction for semantic communication module
updates of agents"): FL of a VQ-based digital JSCC (models/vqjscc.py) under uplink capacity limits,
with a feature-reconstruction (FR) step at the base station.

Every user trains locally on all its samples (train_delta: private and public together). Its uplink
budget this round is the capacity of its link: link.uplink_bandwidth_hz * fedsfr.slot_s *
log2(1 + SNR) bits, the payload's metadata included.
- Users at or above ``fedsfr.threshold_db`` (S_u) send their update, error feedback included: per
  tensor the top-k of |dW + e|, with k set by the largest per-layer keep fraction whose exact bit
  count fits the budget. The kept values are then quantised stochastically onto the QAM grid
  (compress.svq_error_feedback, codec ``svq<b>``).
- Users below it (S_m) send codeword indices of their trained encoder's features. These come from a
  random subset of their public samples (``fedsfr.public_fraction`` of each user's data, fixed per
  user), as many images as the budget carries (codec ``index<b>``: b bits per vector). Their error
  memory is reset.
The base station adds the data-size-weighted mean of the S_u updates to the global model (eq 12).
It then takes ``fedsfr.server_epochs`` epochs of SGD (``fedsfr.server_lr``, smaller than the
clients', Theorem 1) on the FR loss (eq 16): codewords c -> virtual channel at channel.snr_db ->
detection -> D -> E -> z_hat, loss mean |z_hat - c|^2. Then it broadcasts the model.
``fedsfr.mode = "compressed-fedavg"`` is the paper's "FedAvg with the same compression" baseline:
every user sends its compressed update, and there is no FR. ``fedsfr.weighting`` gives its other two
aggregation-weight baselines: the softmax of the users' losses (Xing et al.) and FedLol.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from semfl.wireless.codecs import Payload
from semfl.wireless.codecs.base import META_BITS, _count_scalars
from semfl.wireless.compress import svq_error_feedback, svq_fraction_for_budget
from semfl.config import ConfigError, option, register_table
from semfl.protocol.method import register_method
from semfl.methods.common import loss_rows, reply_meta, to_cpu, to_device, train_delta
from semfl.methods.fedavg import FedAvg
from semfl.models.vqjscc import largest_margin, nearest_codeword
from semfl.protocol import seeding
from semfl.protocol.context import UserContext
from semfl.training import RunningAverage, batches, evaluate_semantic, load_weights, make_optimizer, snr_tensor, weights_of

MODES = ("fr", "compressed-fedavg")
WEIGHTINGS = ("size", "loss-softmax", "fedlol")


def aggregation_weights(losses: list[float], sizes: list[int], rule: str) -> list[float]:
    """The aggregation weights of the paper's first three baselines: data size (FedAvg), the softmax of
    the users' training losses (Xing et al.: larger loss, larger weight) or FedLol's
    (sum L - L_k) / ((K - 1) sum L) (Nguyen et al.: smaller loss, larger weight)."""
    if rule == "size":
        return [n / sum(sizes) for n in sizes]
    if rule == "loss-softmax":
        top = max(losses)
        e = [math.exp(v - top) for v in losses]
        return [v / sum(e) for v in e]
    if len(losses) == 1:
        return [1.0]
    total = sum(losses)
    return [(total - v) / ((len(losses) - 1) * total) for v in losses]


class WeightedUpdates:
    """Running sums that give sum_k w_k update_k for any rule of aggregation_weights without
    holding K updates: FedLol's weights need the sum of all losses, so it keeps sum_k u_k and
    sum_k L_k u_k and combines them at the end; softmax weights are exp(L_k) normalised."""

    def __init__(self, rule: str):
        self.rule = rule
        self.plain, self.by_loss = RunningAverage(), RunningAverage()
        self.count, self.loss_sum = 0, 0.0

    def add(self, tensors: dict, loss: float, size: int) -> None:
        self.count += 1
        self.loss_sum += loss
        if self.rule == "size":
            self.plain.add(tensors, size)
        elif self.rule == "loss-softmax":
            self.plain.add(tensors, math.exp(loss))  # exp overflows only for losses > 700
        else:
            self.plain.add(tensors, 1.0)
            self.by_loss.add(tensors, loss)

    def result(self, like: dict) -> dict | None:
        if self.count == 0:
            return None
        mean = self.plain.result(like)
        if self.rule != "fedlol" or self.count == 1 or self.loss_sum == 0:
            return mean
        # sum_k (S - L_k) u_k / ((K - 1) S) = (K mean_k u_k - sum_k L_k u_k / S) / (K - 1)
        loss_weighted = self.by_loss.result(like)
        k = self.count
        return {name: (k * mean[name] - loss_weighted[name]) / (k - 1) for name in mean}


@dataclass
class FedSFROptions:
    mode: str = option("fr", "fr: FedSFR; compressed-fedavg: every user sends a compressed update, no FR")
    threshold_db: float = option(10.0, "users at or above this link SNR send updates, the others features")
    slot_s: float = option(0.05, "uplink time per round: the budget is B_up * slot_s * log2(1 + SNR) bits")
    public_fraction: float = option(0.2, "of each user's samples: its public data, where features come from")
    server_epochs: int = option(3, "the paper: 3")
    server_lr: float = option(0.0, "FR learning rate; 0 = train.lr / 10")
    server_batch_size: int = option(0, "0 = train.batch_size")
    bits_per_symbol: int = option(8, "codebook = 2**b-QAM (the paper: 256-QAM)")
    margin: float = option(0.05, "encoder output bound (1 - margin) * max|codeword coordinate|; must stay below 1 / (sqrt(M) - 1) (1/15 for 256-QAM), or the outer ring of codewords is unreachable")
    usage_weight: float = option(0.01, "beta of eq 3 (codeword usage KL)")
    measure_fr: bool = option(False, "evaluate the global model before and after FR each round (fr_gain_db)")
    weighting: str = option("size", "aggregation weights of the updates: size (eq 12) | loss-softmax | fedlol")
    lr_decay: float = option(1.0, "users' and FR learning rates x lr_decay ** ((round - 1) // lr_decay_every); the paper: 0.9 every 10")
    lr_decay_every: int = option(10, "rounds between two steps of the learning-rate decay (lr_decay)")

    def validate(self, cfg) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"fedsfr.mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if cfg.model.arch != "vq-jscc":
            raise ConfigError(f"model.arch: {cfg.method} trains the VQ-based digital JSCC; set model.arch = 'vq-jscc' "
                              f"(got {cfg.model.arch!r})")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"fedsfr.weighting: expected one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.bits_per_symbol not in (4, 6, 8):
            raise ConfigError(f"fedsfr.bits_per_symbol: expected 4, 6 or 8 (16-, 64- or 256-QAM), got {self.bits_per_symbol}")
        if self.slot_s <= 0:
            raise ConfigError(f"fedsfr.slot_s: must be > 0, got {self.slot_s}")
        if not 0 < self.public_fraction <= 1:
            raise ConfigError(f"fedsfr.public_fraction: must be in (0, 1], got {self.public_fraction}")
        if self.server_epochs < 0 or self.server_lr < 0 or self.server_batch_size < 0:
            raise ConfigError("fedsfr.server_epochs: server_epochs, server_lr and server_batch_size must be >= 0")
        if not 0 < self.lr_decay <= 1 or self.lr_decay_every < 1:
            raise ConfigError(f"fedsfr.lr_decay: must be in (0, 1] with lr_decay_every >= 1, got {self.lr_decay} "
                              f"every {self.lr_decay_every}")
        if self.usage_weight < 0:
            raise ConfigError(f"fedsfr.usage_weight: must be >= 0, got {self.usage_weight}")
        limit = largest_margin(self.bits_per_symbol)
        if not 0 <= self.margin < limit:
            raise ConfigError(f"fedsfr.margin: must be in [0, {limit:.4f}) for {2 ** self.bits_per_symbol}-QAM "
                              f"(bits_per_symbol {self.bits_per_symbol}): at {self.margin} the encoder's bound "
                              f"(1 - margin) max|c| stops short of the outer codewords' decision boundary, so "
                              f"{4 * 2 ** (self.bits_per_symbol // 2) - 4} of {2 ** self.bits_per_symbol} codewords "
                              f"could never be sent")


register_table("fedsfr", FedSFROptions)


def lr_factor(options: FedSFROptions, round_: int) -> float:
    """The learning-rate multiplier of a round (1-based): lr_decay ** ((round - 1) // lr_decay_every)."""
    return options.lr_decay ** ((max(round_, 1) - 1) // options.lr_decay_every)


def scheduled_train(train_cfg, options: FedSFROptions, round_: int):
    """train_cfg with the learning rate of this round (fedsfr.lr_decay)."""
    return dataclasses.replace(train_cfg, lr=train_cfg.lr * lr_factor(options, round_))


def fit_pairs(module_out, inputs: torch.Tensor, targets: torch.Tensor, epochs: int, optimizer, batch_size: int,
              generator: torch.Generator) -> float:
    """Epochs of mean |module_out(input) - target|^2 over (input, target) pairs in mini-batches;
    returns the first epoch's mean loss."""
    first, count = 0.0, 0
    for epoch in range(epochs):
        for idx in batches(len(inputs), batch_size, generator):
            idx = idx.to(inputs.device)
            loss = F.mse_loss(module_out(inputs[idx]), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if epoch == 0:
                first, count = first + float(loss.detach()) * len(idx), count + len(idx)
    return first / max(count, 1)


def capacity_bits(bandwidth_hz: float, slot_s: float, snr_db: float) -> int:
    """Bits an error-free uplink carries in one slot at this SNR (Shannon)."""
    return int(bandwidth_hz * slot_s * math.log2(1 + 10 ** (snr_db / 10)))


@register_method
class FedSFR(FedAvg):
    name = "fedsfr"
    tables = ("foundation", "fedsfr")  # its own aggregation (eq 5 weights, FR), not [aggregation]'s rules
    precisions = ("fp32",)
    row_fields: tuple[str, ...] = ("budget_bits", "keep_fraction", "images")  # reply meta kept in user rows

    def __init__(self, run, transport):
        super().__init__(run, transport)
        self.options: FedSFROptions = self.cfg.table("fedsfr")
        o = self.options
        self.model.configure(o.bits_per_symbol, o.margin, o.usage_weight)

    def handlers(self):
        return {"train": self.user_train}  # no vmap: compression is per user

    @classmethod
    def build_global(cls, run):
        model = super().build_global(run)
        o = run.cfg.table("fedsfr")
        model.configure(o.bits_per_symbol, o.margin, o.usage_weight)  # the codebook the run trained with
        return model

    def expected_reply(self, kind: str) -> dict[str, torch.Tensor] | None:
        return None  # codebook indices or compressed updates, depending on the round's request

    def request_meta(self, round_: int) -> dict:
        return {}

    def round_train(self, round_: int):
        return scheduled_train(self.cfg.train, self.options, round_)

    # ---------------------------------------------------------------- users
    def public_indices(self, ctx: UserContext) -> torch.Tensor:
        """The user's public samples: a fixed ``public_fraction`` of its data, the same every round."""
        n = ctx.num_samples
        order = torch.randperm(n, generator=seeding.generator(self.cfg.seed, "public", ctx.user))
        return order[:max(1, math.ceil(self.options.public_fraction * n))].to(ctx.x.device)

    def sends_features(self, snr_db: float) -> bool:
        return self.options.mode == "fr" and snr_db < self.options.threshold_db

    def user_train(self, ctx: UserContext, payload: Payload) -> Payload:
        o = self.options
        delta, loss, _ = train_delta(self.run, self.model, payload.tensors, ctx, train_cfg=self.round_train(ctx.round))
        budget = capacity_bits(self.cfg.link.uplink_bandwidth_hz, o.slot_s, ctx.snr_db)
        meta = {**reply_meta(self.run, self.model, ctx, loss), "budget_bits": budget}
        if self.sends_features(ctx.snr_db):
            ctx.state.pop("residual", None)  # the error memory is reset for S_m
            meta["images"] = 0  # a placeholder, so that the budget counts this field's own bits
            vectors = self.model.tokens * self.model.symbols_per_token  # 2-D feature vectors per image
            per_image = vectors * o.bits_per_symbol  # one codeword index each
            public = self.public_indices(ctx)
            count = min(len(public), max(0, (budget - META_BITS * _count_scalars(meta)) // per_image))
            pick = public[torch.randperm(len(public), generator=ctx.generator("public"))[:count].to(public.device)]
            meta["images"] = int(count)
            indices = torch.zeros(0, vectors, dtype=torch.long)
            if count:
                with torch.no_grad():  # the model holds the user's trained weights
                    indices = nearest_codeword(self.model.features(ctx.x[pick]), self.model.codebook)
            return Payload({"indices": indices.to(torch.uint8).cpu()}, codec=f"index{o.bits_per_symbol}", meta=meta)
        return self.compressed_update(ctx, delta, meta)

    def compressed_update(self, ctx: UserContext, delta: dict, meta: dict) -> Payload:
        """The update within meta["budget_bits"]: top-k with error feedback at the largest keep
        fraction whose exact bit count fits, then the stochastic VQ of the kept values."""
        o = self.options
        meta["keep_fraction"] = 0.0  # a placeholder, as above
        room = meta["budget_bits"] - META_BITS * _count_scalars(meta)
        fraction = svq_fraction_for_budget([d.numel() for d in delta.values()], room, o.bits_per_symbol)
        meta["keep_fraction"] = fraction
        sent, residual = svq_error_feedback(delta, to_device(ctx.state.get("residual"), self.run.device), fraction,
                                            self.model.qam_grid, ctx.generator("svq"))
        ctx.state["residual"] = to_cpu(residual)
        return Payload(sent, codec=f"svq{o.bits_per_symbol}", meta=meta)

    # ---------------------------------------------------------------- base station
    def run_round(self, round_: int, users: list[int]) -> dict[str, Any]:
        updates, features, metas = WeightedUpdates(self.options.weighting), [], {}

        def collect(user, reply):
            metas[user] = reply.meta
            if "indices" in reply.tensors:
                features.append(reply.tensors["indices"])
            else:
                updates.add(reply.tensors, reply.meta["loss"], reply.meta["num_samples"])

        self.transport.send(users, "train", Payload(self.global_weights, codec="dense", meta=self.request_meta(round_)),
                            on_reply=collect)
        mean = updates.result(self.global_weights)  # eq 12 (weighted by data size) or a baseline's weights
        if mean is not None:
            self.global_weights = {k: v + mean[k] for k, v in self.global_weights.items()}
        info: dict[str, Any] = {"update_users": sum("images" not in m for m in metas.values())}
        info["feature_users"] = len(metas) - info["update_users"]
        received = [f for f in features if len(f)]  # a user whose budget carries no image sends none
        vectors = torch.cat(received) if received else None
        if vectors is not None and self.options.server_epochs > 0:
            before = self.test_psnr() if self.options.measure_fr else None
            info["fr_loss"] = self.feature_reconstruction(vectors, round_)
            info["fr_images"] = len(vectors)
            if before is not None:
                info["fr_gain_db"] = self.test_psnr() - before
        rows = loss_rows(metas)
        for row in rows:
            m = metas[row["user"]]
            row.update({k: m[k] for k in self.row_fields if k in m})
            row["role"] = "features" if "images" in m else "update"
        return {**info, "user_rows": rows}

    def test_psnr(self) -> float:
        seeding.enter(self.cfg.seed, self.transport.round, "fr-eval")
        load_weights(self.model, self.global_weights)
        return evaluate_semantic(self.model, self.run.classifier, self.run.test_x, self.run.test_y,
                                 self.cfg.eval.snr_db, self.cfg.eval.batch_size)["psnr_db"]

    def feature_reconstruction(self, indices: torch.Tensor, round_: int) -> float:
        """Eq 13-16: SGD on mean |E(D(detect(c + n))) - c|^2 over the received codewords c; returns the
        mean loss of the first epoch."""
        o, model = self.options, self.model
        # seeded here: the users' handlers (in this process or in workers) leave the generators anywhere
        seeding.enter(self.cfg.seed, round_, "fr")
        load_weights(model, self.global_weights)
        model.train()
        lr = (o.server_lr or self.cfg.train.lr / 10) * lr_factor(o, round_)
        opt = make_optimizer(model.parameters(), self.cfg.train, lr=lr)
        snr = self.cfg.channel.snr_db

        def reconstructed(c):
            with torch.no_grad():  # the virtual channel and the detector: no gradient into c
                y = model.channel(torch.view_as_complex(c.contiguous()), snr_tensor(snr, len(c), c.device))
                detected = model.codewords_of(nearest_codeword(torch.view_as_real(y), model.codebook))
            return model.features(model.decode_codewords(detected))

        codewords = model.codewords_of(indices)  # (N, n, 2): the inputs are also the targets
        first = fit_pairs(reconstructed, codewords, codewords, o.server_epochs, opt,
                          o.server_batch_size or self.cfg.train.batch_size, seeding.generator(self.cfg.seed, round_, "fr"))
        self.global_weights = weights_of(model)
        return first
