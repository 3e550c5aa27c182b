"""Helpers shared by methods: building models for a run, the training SNR of a user."""
from __future__ import annotations

from torch import nn

from semfl.wireless.channel import make_channel
from semfl.methods import aggregation as _aggregation  # noqa: F401  (registers the [aggregation] table)
from semfl.protocol.method import RunContext
from semfl.models import build_model


def build_semantic_model(run: RunContext, arch: str) -> nn.Module:
    cfg = run.cfg
    model = build_model(arch, cfg.scale, run.spec, make_channel(cfg.channel),
                        semantic_dim=cfg.model.semantic_dim, symbols_per_token=cfg.model.symbols_per_token)
    return model.to(run.device)


def train_snr(cfg, ctx) -> float:
    """The channel SNR a user trains at: its link SNR of the round, or a fixed value."""
    return ctx.snr_db if cfg.channel.train_snr == "link" else cfg.channel.snr_db


def reconstruction_rows(run: RunContext, models: dict[str, nn.Module], count: int, snr_db: float):
    """Test images and, per model, its reconstructions with 'PSNR / SSIM' captions."""
    import torch

    from semfl import metrics
    from semfl.training import snr_tensor

    images = run.test_x[:count]
    rows = []
    with torch.no_grad():
        for label, model in models.items():
            model.eval()
            recon = model(images, snr_tensor(snr_db, len(images), images.device)).recon
            p = metrics.psnr_per_image(recon, images)
            s = metrics.ssim_per_image(recon, images)
            rows.append((label, recon, [f"{a:.1f}dB/{b:.3f}" for a, b in zip(p.tolist(), s.tolist())]))
    return images, rows


def on_channel(label: str, kind: str) -> str:
    """The SNR sweep's label of a model tested on another channel kind than its own."""
    return f"{label} ({kind})"


def snr_sweep(run: RunContext, models: dict[str, nn.Module]) -> dict[str, dict[str, list[float]]]:
    """Each model's test metrics at every eval.snr_sweep SNR on its own channel and then, labelled
    'model (kind)', on each eval.sweep_channels kind (the model's channel swapped for the sweep).
    Each SNR point is seeded, so models and channels are compared on the same random draws."""
    from semfl.wireless.channel import Channel
    from semfl.progress import bar
    from semfl.protocol import seeding
    from semfl.training import evaluate_semantic

    snrs = run.cfg.eval.snr_sweep
    steps = bar("SNR sweep", len(snrs) * len(models) * (1 + len(run.cfg.eval.sweep_channels)), unit="points")

    def sweep(model):
        rows = []
        for snr in snrs:
            seeding.enter(run.cfg.seed, "snr-sweep", repr(snr))  # the same noise for every model and channel
            rows.append(evaluate_semantic(model, run.classifier, run.test_x, run.test_y, snr, run.cfg.eval.batch_size))
            steps.advance()
        return {k: [r[k] for r in rows] for k in ("psnr_db", "accuracy", "ssim", "loss")}

    out = {label: sweep(model) for label, model in models.items()}
    for kind in run.cfg.eval.sweep_channels:
        for label, model in models.items():
            own = model.channel
            model.channel = Channel(kind, equalize=run.cfg.channel.equalize).to(next(model.parameters()).device)
            try:
                out[on_channel(label, kind)] = sweep(model)
            finally:
                model.channel = own
    steps.close()
    return out


def channel_uses_ratio(model: nn.Module, images) -> float:
    """k/n of a semantic model: complex channel uses per source value (C*H*W) of one image."""
    import torch

    with torch.no_grad():
        model.eval()
        return model(images[:1], 10.0).X.shape[1] / images[0].numel()


def digital_baseline(run: RunContext, models: dict[str, nn.Module]) -> dict[str, dict[str, list]]:
    """The separation baseline's curves over eval.snr_sweep at each distinct k/n of ``models``
    (labels get ' (k/n=...)' when the models differ), on the run's own channel; the fallback for a
    lost image is the mean training image."""
    from semfl.wireless import separation

    cfg = run.cfg
    ratios = sorted({round(channel_uses_ratio(m, run.test_x), 6) for m in models.values()})
    design = cfg.eval.digital_design_snr
    design = (cfg.link.snr_min_db + cfg.link.snr_max_db) / 2 if design is None else design
    fallback = run.data.train_x.mean(0).to(run.test_x.device)
    encoded = separation.EncodedSet(run.test_x, cfg.eval.digital_codec)
    out = {}
    for ratio in ratios:
        curves = separation.sweep(run.test_x, run.test_y, run.classifier, ratio, list(cfg.eval.snr_sweep),
                                  kind=cfg.channel.kind, equalize=cfg.channel.equalize, design_snr=design,
                                  codec=cfg.eval.digital_codec, fallback=fallback, seed=cfg.seed,
                                  batch_size=cfg.eval.batch_size, encoded=encoded)
        suffix = f" (k/n={ratio:.3g})" if len(ratios) > 1 else ""
        out.update({label + suffix: values for label, values in curves.items()})
    return out


def finish_semantic(run: RunContext, models: dict[str, nn.Module], out_dir) -> dict:
    """Final artifacts every semantic method gives: a reconstruction grid and an SNR sweep."""
    import json
    from pathlib import Path

    from semfl.report import plots
    from semfl.files import atomic_text

    from semfl.progress import bar

    out_dir = Path(out_dir)
    figures = bar("figures", bool(run.cfg.eval.grid_images) + bool(run.cfg.eval.snr_sweep), unit="figures")
    if run.cfg.eval.grid_images:
        images, rows = reconstruction_rows(run, models, run.cfg.eval.grid_images, run.cfg.eval.snr_db)
        plots.image_grid(images, rows, out_dir / "figures" / "reconstructions.png")
        figures.advance()
    summary = {}
    if run.cfg.eval.snr_sweep:
        sweep = snr_sweep(run, models)
        baseline = digital_baseline(run, models) if run.cfg.eval.digital_baseline else {}
        sweep.update(baseline)
        atomic_text(out_dir / "snr_sweep.json", json.dumps({"snr_db": run.cfg.eval.snr_sweep, "models": sweep}, indent=1))
        other = {on_channel(label, kind) for kind in run.cfg.eval.sweep_channels for label in models}
        plots.snr_sweep(sweep, run.cfg.eval.snr_sweep, out_dir / "figures" / "snr_sweep.png", dashed=other, dotted=set(baseline))
        figures.advance()
    figures.close()
    return summary


def steps_data(x, y, steps: int, batch_size: int, generator):
    """Exactly `steps` minibatches worth of samples (steps * batch_size), drawn epoch by epoch
    from fresh permutations, so that one pass of local_train over them is `steps` SGD steps."""
    import math

    import torch

    need = steps * batch_size
    order = torch.cat([torch.randperm(len(x), generator=generator) for _ in range(math.ceil(need / len(x)))])[:need]
    order = order.to(x.device)
    return x[order], y[order]


def train_delta(run: RunContext, model: nn.Module, weights: dict, ctx, steps: int = 0, train_cfg=None):
    """Local training from `weights` (the user's copy of the global model) on the user's data.

    Returns (delta, loss, trained) with delta = w_local - weights per trainable parameter and
    trained = the local weights. steps > 0 trains exactly that many minibatches (FedPAQ's tau)
    instead of train.local_epochs epochs; train_cfg replaces cfg.train (a method's schedule of the round).
    Draws come from ctx.generator("batches") (and
    ctx.generator("steps") for the step sample), so a user's round is deterministic."""
    import dataclasses

    from semfl.training import load_weights, local_train, weights_of

    cfg = run.cfg
    load_weights(model, weights)
    x, y, train_cfg = ctx.x, ctx.y, train_cfg or cfg.train
    if steps > 0:
        x, y = steps_data(x, y, steps, train_cfg.batch_size, ctx.generator("steps"))
        train_cfg = dataclasses.replace(train_cfg, local_epochs=1)
    loss = local_train(model, x, y, train_cfg, train_snr(cfg, ctx), run.classifier, ctx.generator("batches"))
    trained = weights_of(model)
    delta = {k: trained[k] - weights[k].to(trained[k].device) for k in trained}
    return delta, loss, trained


def to_cpu(tensors: dict) -> dict:
    """Per-user state lives on the CPU between rounds (runtime.local)."""
    return {k: v.detach().cpu() for k, v in tensors.items()}


def to_device(tensors: dict | None, device) -> dict | None:
    return None if tensors is None else {k: v.to(device) for k, v in tensors.items()}


def send_and_average(transport, users, request, like: dict, weight=None, aggregation=None, reference=None):
    """Send `request` (one payload or one per user) to `users` and average the replies' tensors as
    they arrive (a running sum, not K held updates). weight(reply) -> float gives each reply's
    weight, by default its sample count (PSFL eq 10). `aggregation` (the [aggregation] table) picks
    a robust rule instead of the mean (methods.aggregation); `reference` is what the replies are
    relative to (the global weights, when users reply with weights rather than updates). Users are trained together where the method
    registered a "train:batched" handler and the transport can batch (the local one; it falls
    back to one by one otherwise). Returns (mean, {user: reply meta})."""
    from semfl.methods.aggregation import Aggregator

    average = Aggregator(aggregation, reference)
    metas = {}

    def collect(user, reply) -> None:
        average.add(reply.tensors, reply.meta["num_samples"] if weight is None else weight(reply))
        metas[user] = reply.meta

    send = transport.send_batched
    send(users, "train", request, on_reply=collect)
    return average.result(like), metas


def reply_meta(run: RunContext, model: nn.Module, ctx, loss: float, sent: dict | None = None) -> dict:
    """The meta of a user's train reply: its sample count and training loss and, in the rounds the
    runner evaluates with ``eval.user_samples`` > 0, its local model's accuracy / loss / PSNR on
    the first ``eval.user_samples`` test images (per-client local accuracy, PSFL Figs 15-16).
    ``sent``: the weights the user sends, when they are not what ``model`` holds (loaded first)."""
    from semfl.training import evaluate_semantic, load_weights

    cfg = run.cfg
    meta = {"num_samples": ctx.num_samples, "loss": loss}
    n = cfg.eval.user_samples
    if n <= 0 or not cfg.evaluates(ctx.round):
        return meta
    if sent is not None:
        load_weights(model, sent)
    result = evaluate_semantic(model, run.classifier, run.test_x[:n], run.test_y[:n], cfg.eval.snr_db,
                               cfg.eval.batch_size)
    return {**meta, "eval_accuracy": result["accuracy"], "eval_loss": result["loss"], "eval_psnr_db": result["psnr_db"]}


def loss_rows(metas: dict) -> list[dict]:
    """User rows from the replies' meta: the training loss and, where evaluated, the local model's
    test accuracy / loss / PSNR."""
    return [{"user": k, "train_loss": m["loss"], **{name[5:]: v for name, v in m.items() if name.startswith("eval_")}}
            for k, m in metas.items()]
