"""Batched users: K users' copies of one architecture train together with ``torch.func``.

``train_users_vmap`` does, for K users at once, exactly what :func:`semfl.training.local_train`
does for one user (SGD with momentum and weight decay, local epochs, shuffled mini-batches,
MSE + task_weight * CE loss, the semantic model's physical channel in the forward pass):

* parameters are stacked along a new leading user dimension and the loss is evaluated with
  ``torch.func.functional_call`` on the one working model, vectorised over users with
  ``torch.func.vmap(torch.func.grad_and_value(...))``;
* the optimiser state (SGD momentum buffers) is per user, stacked the same way, and updated with
  vectorised tensor ops;
* channel randomness cannot be drawn inside ``vmap``: every user's noise (and fading) for every
  step is drawn beforehand with :meth:`semfl.wireless.channel.Channel.sample`, user by user, in the order
  the sequential path would draw it, and handed to the model as a batched
  :class:`~semfl.wireless.channel.ChannelDraw`. With ``draw_seeds`` (what the local transport passes:
  the seed ``seeding.enter`` gives each user before its handler runs), the draws are the very
  numbers the sequential path draws, so batched and sequential training agree to float
  tolerance — not only in distribution;
* models must not keep BatchNorm running statistics (the CSC uses GroupNorm); they are refused.

Users with different amounts of data: the step loop runs to the largest user's number of
mini-batches; each user's batch is padded to ``batch_size`` with sample weights 0 (its last,
partial batch) and a user that has no batch left at a step is frozen for that step (parameters
and momentum kept by a per-user mask). Per-sample operations (GroupNorm, per-image power
normalisation, the channel) keep padded rows from touching real ones, so this is exact; the
padded rows cost compute, so users of very different sizes waste work (group them by size if
that matters).

Only SGD (with or without momentum) is supported; callers fall back to sequential training for
Adam (see :func:`supported`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn import functional as F

from semfl.config import TrainConfig
from semfl.training import batches


def supported(model: nn.Module, cfg: TrainConfig) -> str | None:
    """None if ``train_users_vmap`` can train this model with this config, else the reason."""
    if cfg.optimizer != "sgd":
        return f"train.optimizer={cfg.optimizer!r} (batched training implements SGD only)"
    if cfg.precision != "fp32":
        return f"train.precision={cfg.precision!r} (batched training is fp32)"
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            return "the model has BatchNorm running statistics"
        if isinstance(module, nn.Dropout) and module.p > 0:
            return "the model uses dropout (random inside vmap)"
    if not hasattr(model, "channel"):
        return "the model has no .channel"
    return None


class _DrawnChannel(nn.Module):
    """Stands in for a model's channel while batched: uses the pre-drawn draw it is handed."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.draw = None

    def forward(self, x, snr_db, draw=None):
        return self.inner(x, snr_db, draw=self.draw)


def _symbols(model: nn.Module, sample: torch.Tensor) -> tuple[int, torch.dtype]:
    """Number of complex channel uses per image and their dtype (one probe forward of one image)."""
    with torch.no_grad():
        # every built-in model has the sender's half; a generic one is run whole and X read off
        X = model.transmit_symbols(sample[:1]) if hasattr(model, "transmit_symbols") else model(sample[:1], 100.0).X
    return X.shape[-1], X.dtype


def _pad_draw(draw, rows: int):
    """Pad a ChannelDraw of b rows to ``rows`` (noise 0, h 1, N0 1 on the padding)."""
    b = draw.noise.shape[0]
    if b == rows:
        return draw
    pad = rows - b
    noise = torch.cat([draw.noise, draw.noise.new_zeros(pad, draw.noise.shape[1])])
    h = None if draw.h is None else torch.cat([draw.h, draw.h.new_ones(pad, 1)])
    no = torch.cat([draw.noise_var, draw.noise_var.new_ones(pad, 1)])
    return type(draw)(noise=noise, h=h, noise_var=no)


def train_users_vmap(model: nn.Module, user_weights: Sequence[dict[str, torch.Tensor]],
                     user_data: Sequence[tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig,
                     snr_dbs: Sequence[float], classifier: nn.Module, generators: Sequence[torch.Generator],
                     draw_seeds: Sequence[int] | None = None) -> list[tuple[dict[str, torch.Tensor], float]]:
    """Local training of K users at once; returns each user's (trained weights, mean loss).

    ``user_weights[k]``: the weights user k starts from (parameter name -> tensor; every
    trainable parameter of ``model``). ``user_data[k] = (x, y)``; ``snr_dbs[k]`` its channel SNR;
    ``generators[k]`` the generator of its mini-batch order (as passed to ``local_train``).
    ``draw_seeds[k]``: if given, ``seeding.enter(draw_seeds[k])`` is called before drawing user
    k's channel noise, which reproduces the sequential path's draws exactly.
    """
    reason = supported(model, cfg)
    if reason:
        raise ValueError(f"batched training not supported: {reason}")
    from semfl.protocol import seeding

    K = len(user_weights)
    if not (len(user_data) == len(snr_dbs) == len(generators) == K):
        raise ValueError("user_weights, user_data, snr_dbs and generators need one entry per user")
    device = user_data[0][0].device
    B = cfg.batch_size
    names = [n for n, _ in model.named_parameters()]
    channel = model.channel
    n_sym, cdtype = _symbols(model, user_data[0][0])

    # Mini-batch orders (the sequential path's generator use) and channel draws (outside vmap).
    plans: list[list[torch.Tensor]] = []
    draws: list[list] = []
    for k in range(K):
        n = len(user_data[k][1])
        plan = [idx for _ in range(cfg.local_epochs) for idx in batches(n, B, generators[k])]
        plans.append(plan)
        if draw_seeds is not None:
            seeding.enter(draw_seeds[k])
        draws.append([_pad_draw(channel.sample(len(idx), n_sym, snr_dbs[k], device=device, dtype=cdtype), B)
                      for idx in plan])
    steps = max(len(p) for p in plans)

    params = {n: torch.stack([w[n].to(device) for w in user_weights]).detach().clone() for n in names}
    momentum = {n: torch.zeros_like(p) for n, p in params.items()} if cfg.momentum else None
    total = torch.zeros(K, dtype=torch.float64, device=device)
    count = torch.zeros(K, dtype=torch.float64, device=device)
    task_weight = cfg.task_weight
    holder = _DrawnChannel(channel)

    def loss_fn(p, images, labels, weight, draw):
        holder.draw = draw
        recon = functional_call(model, p, (images, 0.0)).recon
        denom = weight.sum().clamp_min(1.0)
        mse = ((recon - images) ** 2).flatten(1).mean(1)
        loss = (mse * weight).sum() / denom
        if task_weight:
            ce = F.cross_entropy(classifier(recon), labels, reduction="none")
            loss = loss + task_weight * (ce * weight).sum() / denom
        return loss

    step_fn = vmap(grad_and_value(loss_fn))
    was_training = model.training
    model.train()
    model.channel = holder
    try:
        for s in range(steps):
            imgs, labs, wts, step_draws, active = [], [], [], [], []
            for k in range(K):
                x, y = user_data[k]
                if s < len(plans[k]):
                    idx = plans[k][s]
                    b = len(idx)
                    if b < B:
                        idx = torch.cat([idx, idx.new_zeros(B - b)])
                    d = draws[k][s]
                    active.append(True)
                else:
                    idx, b, d = torch.zeros(B, dtype=torch.long), 0, draws[k][0]
                    active.append(False)
                idx = idx.to(x.device)
                imgs.append(x[idx])
                labs.append(y[idx])
                w = torch.zeros(B, device=device)
                w[:b] = 1.0
                wts.append(w)
                step_draws.append(d)
            images = torch.stack(imgs)
            labels = torch.stack(labs)
            weight = torch.stack(wts)
            draw = type(step_draws[0])(
                noise=torch.stack([d.noise for d in step_draws]),
                h=None if step_draws[0].h is None else torch.stack([d.h for d in step_draws]),
                noise_var=torch.stack([d.noise_var for d in step_draws]))
            grads, loss = step_fn(params, images, labels, weight, draw)
            act = torch.tensor(active, device=device)
            nb = weight.sum(1).to(torch.float64)
            total += loss.detach().to(torch.float64) * nb
            count += nb
            with torch.no_grad():
                all_active = bool(act.all())
                for n in names:
                    g = grads[n]
                    p = params[n]
                    if cfg.weight_decay:
                        g = g.add(p, alpha=cfg.weight_decay)
                    if momentum is not None:
                        buf = momentum[n]
                        new_buf = buf * cfg.momentum + g
                        if all_active:
                            momentum[n] = new_buf
                        else:
                            shape = (K,) + (1,) * (p.dim() - 1)
                            momentum[n] = torch.where(act.view(shape), new_buf, buf)
                        g = momentum[n]
                    if all_active:
                        params[n] = p - cfg.lr * g
                    else:
                        shape = (K,) + (1,) * (p.dim() - 1)
                        params[n] = torch.where(act.view(shape), p - cfg.lr * g, p)
    finally:
        model.channel = channel
        holder.draw = None
        model.train(was_training)
    losses = (total / count.clamp_min(1)).tolist()
    return [({n: params[n][k] for n in names}, losses[k]) for k in range(K)]
