"""SKBS (Lu, Zhu, Li, Zhang, WCNC 2024: knowledge-base synchronisation by federated distillation), as
FedSFR's KD baseline: each user keeps a **personal** VQ digital JSCC (the run's model.arch, vq-jscc)
and trains it together with a **compact** JSCC of the same kind but smaller widths; the two learn
from each other (mutual distillation of their reconstructions) and only the compact model is
federated. The base station aggregates the compact models and broadcasts the result.

Per batch, both models see the same images at the same SNR:
  L_personal = MSE(x, x_p) + usage_p + distill_weight * MSE(x_p, stopgrad(x_c))
  L_compact  = MSE(x, x_c) + usage_c + distill_weight * MSE(x_c, stopgrad(x_p))
(MSE + train.task_weight * CE as every reconstruction loss here; usage = FedSFR eq 3's codeword
usage KL). Each total depends on one model's parameters only, so one backward of their sum gives
both gradients. The compact model's update goes up under FedSFR's capacity budget with FedSFR's
compression (top-k + error feedback + stochastic VQ, the [fedsfr] table: slot_s, bits_per_symbol,
weighting, ...): its smaller size buys a larger keep fraction in the same bits, which is how the
FedSFR paper matches SKBS's sparsification to the other methods.

Metrics: the global row is the compact model (the synchronised knowledge base); in the evaluated
rounds each user also tests its personal model on ``skbs.user_eval_samples`` test images
(user rows: personal_psnr_db, ...; the global row: their mean, personal_psnr_db).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from semfl.wireless.channel import make_channel
from semfl.wireless.codecs import Payload
from semfl.config import ConfigError, TrainConfig, option, register_table
from semfl.protocol.method import register_method
from semfl.methods.common import finish_semantic, reply_meta, to_cpu, train_snr
from semfl.methods.fedsfr.fedsfr import FedSFR, capacity_bits
from semfl.models.jscc import JSCC_WIDTHS
from semfl.models.registry import shared_for
from semfl.models.vqjscc import VQJSCC
from semfl.protocol.context import UserContext
from semfl.training import (batches, clip_gradients, evaluate_semantic, load_weights, make_optimizer,
                            reconstruction_loss, snr_tensor, weights_of)


@dataclass
class SKBSOptions:
    compact_width: float = option(0.5, "the compact JSCC's conv widths and encoder output channels, x the run's model")
    distill_weight: float = option(1.0, "weight of each model's MSE to the other's reconstruction")
    user_eval_samples: int = option(200, "test images for each user's personal model in evaluated rounds (0 = off)")

    def validate(self, cfg) -> None:
        if not 0 < self.compact_width <= 1:
            raise ConfigError(f"skbs.compact_width: must be in (0, 1], got {self.compact_width}")
        if self.distill_weight < 0:
            raise ConfigError(f"skbs.distill_weight: must be >= 0, got {self.distill_weight}")
        if self.user_eval_samples < 0:
            raise ConfigError(f"skbs.user_eval_samples: must be >= 0 (0 = off), got {self.user_eval_samples}")


register_table("skbs", SKBSOptions)


def mutual_distillation(personal: nn.Module, compact: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        cfg: TrainConfig, snr_db: float, classifier: nn.Module, generator: torch.Generator,
                        distill_weight: float) -> dict[str, float]:
    """train.local_epochs epochs of both models on (x, y), each pulled towards the other's detached
    reconstruction; returns the mean totals and distillation terms of both."""
    personal.train()
    compact.train()
    opt_p, opt_c = make_optimizer(personal.parameters(), cfg), make_optimizer(compact.parameters(), cfg)
    sums = dict.fromkeys(("personal_loss", "compact_loss", "personal_distill", "compact_distill"), 0.0)
    count = 0
    for _ in range(cfg.local_epochs):
        for idx in batches(len(x), cfg.batch_size, generator):
            images, labels = x[idx], y[idx]
            snr = snr_tensor(snr_db, len(idx), images.device)
            out_p, out_c = personal(images, snr), compact(images, snr)
            totals = {}
            for role, out, other in (("personal", out_p, out_c), ("compact", out_c, out_p)):
                task, _ = reconstruction_loss(out.recon, images, labels, classifier, cfg.task_weight)
                distill = F.mse_loss(out.recon, other.recon.detach())
                totals[role] = task + distill_weight * distill + (out.aux if out.aux is not None else 0.0)
                sums[f"{role}_loss"] += float(totals[role].detach()) * len(idx)
                sums[f"{role}_distill"] += float(distill.detach()) * len(idx)
            opt_p.zero_grad(set_to_none=True)
            opt_c.zero_grad(set_to_none=True)
            (totals["personal"] + totals["compact"]).backward()
            clip_gradients(personal, cfg.grad_clip)
            clip_gradients(compact, cfg.grad_clip)
            opt_p.step()
            opt_c.step()
            count += len(idx)
    return {k: v / max(count, 1) for k, v in sums.items()}


@register_method
class SKBS(FedSFR):
    name = "skbs"
    tables = FedSFR.tables + ("skbs",)  # the codebook, budget and compression of [fedsfr]
    row_fields = FedSFR.row_fields + ("personal_loss", "compact_distill", "personal_psnr_db", "personal_ssim",
                                      "personal_accuracy")

    @classmethod
    def objective(cls, cfg):
        """FedSFR's (eq 20's task loss, codeword usage) for the compact and the personal model, each plus
        skbs.distill_weight * MSE to the other's reconstruction (mutual distillation)."""
        own = super().objective(cfg)
        mutual = f"{cfg.table('skbs').distill_weight:g}*MSE(x_hat, stopgrad(other model's x_hat))"
        return dataclasses.replace(own, extra=own.extra + (mutual,))

    def __init__(self, run, transport):
        super().__init__(run, transport)
        o: SKBSOptions = self.cfg.table("skbs")
        self.skbs = o
        self.personal = self.model  # the run's vq-jscc: one working personal model
        self.personal_init = to_cpu(weights_of(self.personal))  # every user's personal model starts here
        cfg, shrink = self.cfg, lambda n: max(1, round(n * o.compact_width))
        full = shared_for(cfg.scale, cfg.model.semantic_dim, cfg.model.symbols_per_token)
        shared = dataclasses.replace(full, semantic_dim=shrink(full.semantic_dim))  # same symbols: same channel use
        widths = tuple(shrink(w) for w in JSCC_WIDTHS[cfg.scale])
        self.model = VQJSCC(run.spec, make_channel(cfg.channel), shared, widths).to(run.device)
        self.model.configure(self.options.bits_per_symbol, self.options.margin, self.options.usage_weight)
        self.global_weights = weights_of(self.model)
        sizes = {"personal": self.personal, "compact": self.model}
        run.log("skbs: " + ", ".join(f"{k} {sum(p.numel() for p in m.parameters()):,} parameters" for k, m in sizes.items()))

    def sends_features(self, snr_db: float) -> bool:
        return False  # every user sends its compact model's update

    def request_meta(self, round_: int) -> dict:
        return {"evaluate": bool(self.cfg.evaluates(round_) and self.skbs.user_eval_samples)}

    def user_train(self, ctx: UserContext, payload: Payload) -> Payload:
        load_weights(self.personal, ctx.state.get("personal", self.personal_init))
        load_weights(self.model, payload.tensors)
        stats = mutual_distillation(self.personal, self.model, ctx.x, ctx.y, self.round_train(ctx.round), train_snr(self.cfg, ctx),
                                    self.run.classifier, ctx.generator("batches"), self.skbs.distill_weight)
        ctx.state["personal"] = to_cpu(weights_of(self.personal))
        trained = weights_of(self.model)
        delta = {k: trained[k] - payload.tensors[k].to(trained[k].device) for k in trained}
        budget = capacity_bits(self.cfg.link.uplink_bandwidth_hz, self.options.slot_s, ctx.snr_db)
        meta = {**reply_meta(self.run, self.model, ctx, stats["compact_loss"]), "budget_bits": budget,
                "personal_loss": stats["personal_loss"], "compact_distill": stats["compact_distill"]}
        if payload.meta.get("evaluate"):
            n = self.skbs.user_eval_samples
            result = evaluate_semantic(self.personal, self.run.classifier, self.run.test_x[:n], self.run.test_y[:n],
                                       self.cfg.eval.snr_db, self.cfg.eval.batch_size)
            meta.update({f"personal_{k}": result[k] for k in ("psnr_db", "ssim", "accuracy")})
        return self.compressed_update(ctx, delta, meta)

    def run_round(self, round_: int, users: list[int]) -> dict[str, Any]:
        info = super().run_round(round_, users)
        tested = [r["personal_psnr_db"] for r in info["user_rows"] if "personal_psnr_db" in r]
        if tested:
            info["personal_psnr_db"] = sum(tested) / len(tested)
        return info

    def finish(self, out_dir):
        models: dict[str, nn.Module] = {"skbs (compact, federated)": self.global_model()}
        state = (self.transport.fetch_state(0, ["personal"]) or {}).get("personal")  # None: node gone
        if state is not None:
            load_weights(self.personal, state)
            models["personal u0"] = self.personal
        return finish_semantic(self.run, models, out_dir)
