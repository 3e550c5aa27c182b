"""FTTQ / T-FedAvg (Xu et al. 2020): federated trained ternary quantisation.

Quantised tensors are those of semfl.wireless.compress.ternary_layers: weights with dim >= 2 except the
layer that reads the input and the layer that writes the output, found by data flow (io_layers:
the first and last layers with a weight that run in a forward pass, which on GSC are the patch
embedding and decoder_pred, not the first and last registered); biases and norms stay full precision. A user loads the broadcast model,
keeps its ternary tensors as the latent full-precision weights theta, and trains with
theta^t = TernaryQuant(theta, w_p) in the forward pass (straight-through gradients; one learnable
scale w_p per quantised tensor, initialised to the broadcast tensor's scale, 1 if it is all zero)
while the other tensors train in full precision. It uploads theta^t (codec "ternary": 2 bits per
entry + 32 for w_p) and the full-precision tensors (codec "dense") in one payload with per-tensor
codecs. The base station averages the uploads (weighted by sample count as T-FedAvg) and
re-ternarises the quantised tensors for the downlink as the authors' code does: Delta =
0.05 sum|theta|/(d0 d1) (`fttq.threshold = "adaptive"`; users use 0.07) or 0.05 max|theta|
("fixed"), scale = mean |theta| over |theta| > Delta (TWN's least-squares scale). The global
model, evaluated and broadcast, is that ternary model; the initial model is re-ternarised the
same way before round 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from semfl.wireless.codecs import Payload
from semfl.wireless.codecs.ternary import ternary_scale
from semfl.wireless.compress import TernaryQuant, ternary_layers, ternary_threshold
from semfl.config import ConfigError, option, register_table
from semfl.protocol.method import register_method
from semfl.methods.common import loss_rows, reply_meta, send_and_average, train_snr
from semfl.methods.fedavg import FedAvg
from semfl.protocol.context import UserContext
from semfl.training import load_weights, local_train


@dataclass
class FTTQOptions:
    threshold: str = option("adaptive", "adaptive: 0.07 sum|theta| / (d0 d1) (authors' default); fixed: 0.05 max|theta|")

    def validate(self, cfg) -> None:
        if self.threshold not in ("adaptive", "fixed"):
            raise ConfigError(f"fttq.threshold: expected 'adaptive' or 'fixed', got {self.threshold!r}")


register_table("fttq", FTTQOptions)


class TernaryWeight(nn.Module):
    """Parametrisation theta -> TernaryQuant(theta, w_p) with a learnable scale w_p."""

    def __init__(self, wp: float, mode: str):
        super().__init__()
        self.wp = nn.Parameter(torch.tensor(float(wp)))
        self.mode = mode

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        return TernaryQuant.apply(theta, self.wp, self.mode)


SERVER_ADAPTIVE = 0.05  # the authors' server rule: Delta = 0.05 sum|theta| / (d0 d1) (users: 0.07)


def requantise(theta: torch.Tensor, mode: str) -> torch.Tensor:
    """Server-side ternarisation (authors' quantize_server): Delta = 0.05 sum|theta| / (d0 d1)
    ("adaptive") or 0.05 max|theta| ("fixed"); scale w = mean |theta| over |theta| > Delta;
    theta -> w 1[theta > Delta] - w 1[theta < -Delta]."""
    delta = ternary_threshold(theta, mode)
    if mode == "adaptive":
        delta = delta * (SERVER_ADAPTIVE / 0.07)
    above = theta.abs() > delta
    if not bool(above.any()):
        return torch.zeros_like(theta)
    w = theta.abs()[above].mean()
    zero = torch.zeros((), dtype=theta.dtype, device=theta.device)
    return torch.where(theta > delta, w, torch.where(theta < -delta, -w, zero))


def io_layers(model: nn.Module, spec, device) -> tuple[str, str]:
    """The weights (dim >= 2) of the layer that reads the input and of the layer that writes the output:
    forward hooks on every module that owns such a weight record the order in which they run on a
    dummy batch; the first to start and the last to finish. The random state is left as it was."""
    from semfl.wireless.channel import preserved_rng

    owners = {module: f"{prefix}.{name}" if prefix else name
              for prefix, module in model.named_modules()
              for name, p in module.named_parameters(recurse=False) if p.dim() >= 2 and name.endswith("weight")}
    started, finished = [], []
    hooks = [m.register_forward_pre_hook(lambda m, args: started.append(owners[m])) for m in owners]
    hooks += [m.register_forward_hook(lambda m, args, out: finished.append(owners[m])) for m in owners]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), preserved_rng(device):
            images = torch.zeros(2, spec.channels, spec.height, spec.width, device=device)
            model(images, torch.full((2,), 10.0, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not started:
        raise ValueError("fttq: the model ran no layer with a weight matrix")
    return started[0], finished[-1]


@register_method
class FTTQ(FedAvg):
    """FedAvg's evaluation, checkpoint and finish on the ternary global model."""

    name = "fttq"
    tables = FedAvg.tables + ("fttq",)

    def __init__(self, run, transport):
        super().__init__(run, transport)
        self.options: FTTQOptions = self.cfg.table("fttq")
        self.quantised = ternary_layers(dict(self.model.named_parameters()), io_layers(self.model, run.spec, run.device))
        self.global_weights = self.requantise(self.global_weights)

    def requantise(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: requantise(v, self.options.threshold) if k in self.quantised else v for k, v in weights.items()}

    def payload(self, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Payload:
        return Payload(tensors, codec="dense", codecs={k: "ternary" for k in self.quantised}, meta=meta or {})

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        path, _, attr = name.rpartition(".")
        return self.model.get_submodule(path), attr

    def handlers(self):
        # no "train:batched" (FedAvg's vmapped training): the uplink compression is per user
        return {"train": self.user_train}

    def user_train(self, ctx: UserContext, payload: Payload) -> Payload:
        load_weights(self.model, payload.tensors)
        for name in self.quantised:
            module, attr = self._owner(name)
            wp = float(ternary_scale(payload.tensors[name])) or 1.0
            # w_p lives on the weight's device: autograd accumulates its gradient there
            scale = TernaryWeight(wp, self.options.threshold).to(getattr(module, attr).device)
            parametrize.register_parametrization(module, attr, scale)
        try:
            loss = local_train(self.model, ctx.x, ctx.y, self.cfg.train, train_snr(self.cfg, ctx),
                               self.run.classifier, ctx.generator("batches"))
            with torch.no_grad():
                sent = {name: getattr(*self._owner(name)).detach().clone() for name in self.quantised}
        finally:
            for name in self.quantised:
                parametrize.remove_parametrizations(*self._owner(name), leave_parametrized=False)
        for name, p in self.model.named_parameters():
            if name not in sent:
                sent[name] = p.detach().clone()
        # evaluated as it is sent: ternary layers + the rest
        return self.payload(sent, reply_meta(self.run, self.model, ctx, loss, sent=sent))

    def run_round(self, round_: int, users: list[int]) -> dict[str, Any]:
        mean, metas = send_and_average(self.transport, users, self.payload(self.global_weights),
                                        self.global_weights, aggregation=self.cfg.table("aggregation"),
                                        reference=self.global_weights)
        self.global_weights = self.requantise(mean)
        return {"user_rows": loss_rows(metas)}
