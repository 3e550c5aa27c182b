"""FedSFD (Xu, Xu, Dou, Chen, Wang, IoT-J 2024: federated KD-assisted image semantic communication),
as FedSFR's second KD baseline and as FedSFR's paper describes it: users and the base station
exchange pairs of *encoder output features* and *intermediate decoder features*, and knowledge
distillation updates only the model part between those two features; the rest of each user's model
is trained on its own data alone. There is no aggregated model: every user keeps a personal VQ digital
JSCC (model.arch = vq-jscc, codebook and loss from the [fedsfr] table).

The part between the two features, the **middle**, is the decoder's start: codewords -> from_symbols
-> the first decoder block, whose output map is the intermediate decoder feature. The base station
holds its own, larger middle (``fedsfd.server_width`` x the channels, one more layer).

Round t:
1. The request carries the base station's knowledge from round t-1: the codeword indices of the pairs
   it received and its middle's outputs on them. Each user first distils its middle towards them
   (``distill_epochs`` of mean |middle_k(c) - middle_S(c)|^2, only the middle's parameters), then
   trains its whole model on its data (train.local_epochs, MSE + codeword usage as FedSFR).
2. It uploads ``fedsfd.pairs`` pairs from its own data: the codeword indices of its encoder's
   features (b bits each, codec index<b>) and its middle's output on those codewords (32-bit floats).
   Nothing caps this upload: FedSFR notes that FedSFD's uplink cost is much higher than the others'.
3. The base station fits its middle to all received pairs (``server_epochs`` of mean squared error),
   then computes its outputs on them for the next request.

Metrics: every user's personal model on the test subset (user rows); the global row is their mean.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from semfl.wireless.codecs import Payload
from semfl.config import ConfigError, option, register_table
from semfl.protocol.method import Method, register_method
from semfl.methods.common import build_semantic_model, finish_semantic, loss_rows, to_cpu, train_snr
from semfl.methods.fedsfr.fedsfr import FedSFR, fit_pairs, lr_factor, scheduled_train
from semfl.models.vqjscc import nearest_codeword
from semfl.protocol import seeding
from semfl.protocol.context import UserContext
from semfl.training import evaluate_semantic, load_weights, local_train, make_optimizer, weights_of

MIDDLE_PREFIXES = ("from_symbols.", "decoder.0.", "decoder.1.")  # codewords -> intermediate decoder feature


@dataclass
class FedSFDOptions:
    pairs: int = option(50, "feature pairs each user uploads per round (the paper: 50)")
    server_width: float = option(2.0, "the base station's middle: channels x this, and one more layer")
    server_epochs: int = option(3, ">= 1")
    server_lr: float = option(0.0, "0 = train.lr")
    distill_epochs: int = option(1, "each user's epochs over the broadcast pairs")
    distill_lr: float = option(0.0, "0 = train.lr")
    user_eval_samples: int = option(0, "test images for each user's evaluation (0 = the whole test subset)")

    def validate(self, cfg) -> None:
        if self.pairs < 1:
            raise ConfigError(f"fedsfd.pairs: must be >= 1, got {self.pairs}")
        if self.server_width <= 0:
            raise ConfigError(f"fedsfd.server_width: must be > 0, got {self.server_width}")
        if self.server_epochs < 1:  # 0 would broadcast an untrained base-station middle as the targets
            raise ConfigError(f"fedsfd.server_epochs: must be >= 1 (the base station fits its middle before "
                              f"broadcasting its outputs), got {self.server_epochs}")
        for name in ("server_lr", "distill_epochs", "distill_lr", "user_eval_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"fedsfd.{name}: must be >= 0, got {getattr(self, name)}")


register_table("fedsfd", FedSFDOptions)


def codeword_map(model: nn.Module, codewords: torch.Tensor) -> torch.Tensor:
    """Codewords (B, n, 2) -> the decoder's input map (B, 2s, h, w)."""
    return model.symbol_map(torch.view_as_complex(codewords.contiguous()))


def middle(model: nn.Module, codewords: torch.Tensor) -> torch.Tensor:
    """A user's middle: codewords (B, n, 2) -> its intermediate decoder feature map."""
    return model.decoder[:2](model.from_symbols(codeword_map(model, codewords)))


class ServerMiddle(nn.Module):
    """The base station's middle: the same input and output as a user's, wider and one layer deeper."""

    def __init__(self, model: nn.Module, width: float):
        super().__init__()
        inner = max(1, round(model.semantic_dim * width))
        out = model.decoder[0].out_channels
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(2 * model.symbols_per_token, inner, 5, 1, 2), nn.PReLU(),
            nn.ConvTranspose2d(inner, inner, 5, 1, 2), nn.PReLU(),
            nn.ConvTranspose2d(inner, out, 5, 1, 2), nn.PReLU(),
        )

    def forward(self, symbol_map: torch.Tensor) -> torch.Tensor:
        return self.layers(symbol_map)


@register_method
class FedSFD(Method):
    name = "fedsfd"
    tables = ("fedsfr", "fedsfd")  # the codebook, usage loss and schedule of [fedsfr]
    precisions = ("fp32",)

    def __init__(self, run, transport):
        super().__init__(run, transport)
        self.options: FedSFDOptions = self.cfg.table("fedsfd")
        self.vq = vq = self.cfg.table("fedsfr")  # the codebook, the usage loss and the learning-rate schedule
        self.model = build_semantic_model(run, self.cfg.model.arch)  # one working personal model
        self.model.configure(vq.bits_per_symbol, vq.margin, vq.usage_weight)
        self.personal_init = to_cpu(weights_of(self.model))  # every user's model starts here
        self.server = ServerMiddle(self.model, self.options.server_width).to(run.device)
        self.knowledge: dict[str, torch.Tensor] = {}  # the base station's pairs for the next request

    @classmethod
    def objective(cls, cfg):
        """Each user's local training as FedSFR's (eq 20's task loss and the codeword-usage term), after
        a separate step that fits its middle to the base station's features."""
        own = FedSFR.objective(cfg)
        return replace(own, extra=own.extra + ("before it, the middle alone: MSE to the base station's features",))

    def handlers(self):
        return {"train": self.user_train}

    def index_codec(self) -> str:
        return f"index{self.model.bits_per_symbol}"

    # ---------------------------------------------------------------- users
    def distill_middle(self, knowledge: dict[str, torch.Tensor], generator: torch.Generator, round_: int = 1) -> float:
        """The working model's middle (only) towards the base station's outputs on its pairs."""
        model, o = self.model, self.options
        codewords = model.codewords_of(knowledge["indices"])
        params = [p for n, p in model.named_parameters() if n.startswith(MIDDLE_PREFIXES)]
        lr = (o.distill_lr or self.cfg.train.lr) * lr_factor(self.vq, round_)
        optimizer = make_optimizer(params, self.cfg.train, lr=lr)
        model.train()
        return fit_pairs(lambda c: middle(model, c), codewords, knowledge["targets"].to(self.run.device), o.distill_epochs,
                   optimizer, self.cfg.train.batch_size, generator)

    def user_train(self, ctx: UserContext, payload: Payload) -> Payload:
        o, cfg, model = self.options, self.cfg, self.model
        load_weights(model, ctx.state.get("personal", self.personal_init))
        meta: dict[str, Any] = {"num_samples": ctx.num_samples}
        if len(payload.tensors.get("indices", ())):
            meta["distill_loss"] = self.distill_middle(payload.tensors, ctx.generator("distill"), ctx.round)
        train = scheduled_train(cfg.train, self.vq, ctx.round)
        meta["loss"] = local_train(model, ctx.x, ctx.y, train, train_snr(cfg, ctx), self.run.classifier,
                                   ctx.generator("batches"))
        pick = torch.randperm(ctx.num_samples, generator=ctx.generator("pairs"))[:o.pairs].to(ctx.x.device)
        with torch.no_grad():
            indices = nearest_codeword(model.features(ctx.x[pick]), model.codebook)
            features = middle(model, model.codewords_of(indices))
        ctx.state["personal"] = to_cpu(weights_of(model))
        return Payload({"indices": indices.to(torch.uint8).cpu(), "targets": features.cpu()}, codec="dense",
                       codecs={"indices": self.index_codec()}, meta=meta)

    # ---------------------------------------------------------------- base station
    def server_middle(self, codewords: torch.Tensor) -> torch.Tensor:
        return self.server(codeword_map(self.model, codewords))

    def run_round(self, round_: int, users: list[int]) -> dict[str, Any]:
        received, metas = {}, {}

        def collect(user, reply):
            received[user], metas[user] = reply.tensors, reply.meta

        codecs = {"indices": self.index_codec()} if self.knowledge else {}
        self.transport.send(users, "train", Payload(self.knowledge, codec="dense", codecs=codecs), on_reply=collect)
        info: dict[str, Any] = {"pairs": 0}
        if received:
            order = sorted(received)  # replies may arrive in any order; the base station's data may not
            indices = torch.cat([received[u]["indices"] for u in order])
            targets = torch.cat([received[u]["targets"] for u in order]).to(self.run.device)
            codewords = self.model.codewords_of(indices)
            seeding.enter(self.cfg.seed, round_, "fedsfd-server")
            self.server.train()
            lr = (self.options.server_lr or self.cfg.train.lr) * lr_factor(self.vq, round_)
            optimizer = make_optimizer(self.server.parameters(), self.cfg.train, lr=lr)
            info["server_distill_loss"] = fit_pairs(self.server_middle, codewords, targets, self.options.server_epochs,
                                              optimizer, self.cfg.train.batch_size,
                                              seeding.generator(self.cfg.seed, round_, "fedsfd-server"))
            with torch.no_grad():
                self.knowledge = {"indices": indices, "targets": self.server_middle(codewords).cpu()}
            info["pairs"] = len(indices)
        rows = loss_rows(metas)
        for row in rows:
            if "distill_loss" in metas[row["user"]]:
                row["distill_loss"] = metas[row["user"]]["distill_loss"]
        return {**info, "user_rows": rows}

    def personal_models(self):
        """(user, weights) of every user that answers, for evaluation (not charged to the link)."""
        for user in range(self.cfg.users):
            state = self.transport.fetch_state(user, ["personal"])
            if state is not None:
                yield user, state.get("personal", self.personal_init)

    def evaluate(self, round_: int) -> list[dict[str, Any]]:
        n = self.options.user_eval_samples or len(self.run.test_y)
        keys = ("loss", "accuracy", "psnr_db", "ssim")
        rows = []
        for user, weights in self.personal_models():
            load_weights(self.model, weights)
            result = evaluate_semantic(self.model, self.run.classifier, self.run.test_x[:n], self.run.test_y[:n],
                                       self.cfg.eval.snr_db, self.cfg.eval.batch_size)
            rows.append({"scope": "user", "user": user, **{k: result[k] for k in keys}})
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys} if rows else {}
        return [{"scope": "global", **mean, "users_evaluated": len(rows)}] + rows

    def state_dict(self) -> dict[str, Any]:
        return {"server": weights_of(self.server), "knowledge": self.knowledge}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_weights(self.server, state["server"])
        self.knowledge = state["knowledge"]

    def finish(self, out_dir):
        first = next(self.personal_models(), None)
        if first is None:
            return {}
        load_weights(self.model, first[1])
        return finish_semantic(self.run, {f"fedsfd personal u{first[0]}": self.model}, out_dir)
