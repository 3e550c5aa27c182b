"""What FedCL and its baselines (FedProto, FedAvg on the same split models) share.

The ``[fedcl]`` config table describes the split system of all three: which encoder each user
has, the feature regulariser weight, the exchange batching and the downlink noise. FedProto has
its own ``[fedproto]`` table for its options; fedavg-split uses ``fedcl.encoder`` for every user.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from semfl.config import ConfigError, option, register_table
from semfl.objective import Objective
from semfl.models.split import ENCODERS, ClassifierHead, SplitEncoder, transmit
from semfl.training import batches, make_optimizer


@dataclass
class FedCLOptions:
    encoders: list[str] = option(factory=list, doc="per user preset, e.g. [\"dcgan-s\", \"dcgan-l\", ...]")
    encoder_rule: str = option("rank", "rank: by data-size rank (smallest third s, middle m, largest l); same: `encoder`")
    encoder: str = option("dcgan-m", "the preset of rule \"same\" and of fedavg-split")
    lam: float = option(0.01, "lambda of eq 10, on the squared L2 distance summed over the 64 dims (= FedProto's MSE x 64)")
    centroid_norm: float = option(5.657, "each F^c rescaled to this L2 norm (0 = the SCG's raw output, as in the paper, whose eq 9 is unbounded below: F grows without end). Default sqrt(32): the norm of a power-normalised 32-symbol feature.")
    head_hidden: int = option(128, "hidden width of the classifier head (semantic decoder)")
    head_lr: float = option(0.0, "eta of eq 4 (0 = train.lr)")
    user_lrs: list[float] = option(factory=list, doc="eta_k of eq 6 per user (empty = train.lr for all)")
    batches_per_message: int = option(8, "mini-batches of features per uplink message (1 = per-batch exchange)")
    downlink_snr_db: float = option(20.0, "SNR of the gradient downlink relative to the gradient power (inf = noiseless)")
    scg_input: str = option("random", "random (fixed random class vectors, the paper) | learned | onehot")
    scg_hidden: int = option(128, "hidden width of the semantic centroid generator (SCG)")
    scg_lr: float = option(0.001, "Adam learning rate of the SCG")
    scg_steps: int = option(10, "E': SCG updates per round on the round's local centroids")
    eval_at_train_snr: bool = option(True, "with channel.train_snr = \"fixed\", evaluate at channel.snr_db (else eval.snr_db)")
    feature_snr_db: float = option(5.0, "SNR of the feature scatter (t-SNE / PCA) in finish, paper Fig 4")
    feature_samples: int = option(600, "test images in that scatter")
    eval_classes: str = option("local", "local: each user is tested on the test images of the classes it holds (FedProto's protocol); all: on the whole test subset")

    def validate(self, cfg) -> None:
        """Each error names exactly the offending field."""
        allowed = ", ".join(ENCODERS)
        bad = [e for e in self.encoders if e not in ENCODERS]
        if bad:
            raise ConfigError(f"fedcl.encoders: unknown encoder {bad[0]!r} (allowed: {allowed})")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"fedcl.encoder: unknown encoder {self.encoder!r} (allowed: {allowed})")
        if self.encoders and len(self.encoders) != cfg.users:
            raise ConfigError(f"fedcl.encoders: needs one encoder per user ({cfg.users}), got {len(self.encoders)}")
        if self.encoder_rule not in ("rank", "same"):
            raise ConfigError(f"fedcl.encoder_rule: expected 'rank' or 'same', got {self.encoder_rule!r}")
        if self.user_lrs and len(self.user_lrs) != cfg.users:
            raise ConfigError(f"fedcl.user_lrs: needs one learning rate per user ({cfg.users}), got {len(self.user_lrs)}")
        if any(lr <= 0 for lr in self.user_lrs):
            raise ConfigError(f"fedcl.user_lrs: learning rates must be > 0, got {self.user_lrs}")
        if self.head_lr < 0:
            raise ConfigError(f"fedcl.head_lr: must be >= 0 (0 = train.lr), got {self.head_lr}")
        if self.centroid_norm < 0:
            raise ConfigError(f"fedcl.centroid_norm: must be >= 0, got {self.centroid_norm}")
        if self.lam < 0:
            raise ConfigError(f"fedcl.lam: must be >= 0, got {self.lam}")
        if self.batches_per_message < 1:
            raise ConfigError(f"fedcl.batches_per_message: must be >= 1, got {self.batches_per_message}")
        # config.py lets both infinities through (INFINITE_OK); only +inf means something (noiseless)
        if math.isnan(self.downlink_snr_db) or self.downlink_snr_db == -math.inf:
            raise ConfigError(f"fedcl.downlink_snr_db: must be a number or inf (noiseless), got {self.downlink_snr_db}")
        if self.scg_input not in ("random", "learned", "onehot"):
            raise ConfigError(f"fedcl.scg_input: expected random, learned or onehot, got {self.scg_input!r}")
        if self.scg_steps < 0:
            raise ConfigError(f"fedcl.scg_steps: must be >= 0, got {self.scg_steps}")
        if self.scg_lr <= 0:
            raise ConfigError(f"fedcl.scg_lr: must be > 0, got {self.scg_lr}")
        if self.eval_classes not in ("local", "all"):
            raise ConfigError(f"fedcl.eval_classes: expected 'local' or 'all', got {self.eval_classes!r}")
        for name in ("head_hidden", "scg_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"fedcl.{name}: must be >= 1, got {getattr(self, name)}")
        if self.feature_samples < 0:
            raise ConfigError(f"fedcl.feature_samples: must be >= 0, got {self.feature_samples}")


register_table("fedcl", FedCLOptions)


def assign_encoders(sizes: list[int], options: FedCLOptions) -> list[str]:
    """Each user's encoder: the per-user list, else by resources (data-size rank), else the same preset."""
    if options.encoders:
        return list(options.encoders)
    if options.encoder_rule == "same":
        return [options.encoder] * len(sizes)
    k = len(sizes)
    order = sorted(range(k), key=lambda u: (sizes[u], u))
    out = [""] * k
    for rank, user in enumerate(order):
        out[user] = ("dcgan-s", "dcgan-m", "dcgan-l")[min(2, rank * 3 // k)]
    return out


def encoders_name(options: FedCLOptions) -> str:
    """The users' encoders as a report names them (``Method.model_name``), e.g. ``dcgan-s/m/l by data size``."""
    if options.encoders:
        return "/".join(dict.fromkeys(options.encoders))
    return options.encoder if options.encoder_rule == "same" else "dcgan-s/m/l by data size"


def split_snr(cfg, ctx) -> float:
    """Training channel SNR of a user: its link SNR of the round or channel.snr_db."""
    return ctx.snr_db if cfg.channel.train_snr == "link" else cfg.channel.snr_db


def eval_snr(cfg) -> float:
    if cfg.table("fedcl").eval_at_train_snr and cfg.channel.train_snr == "fixed":
        return cfg.channel.snr_db
    return cfg.eval.snr_db


def user_test_set(run, user: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images a user is evaluated on: those of the classes it holds (fedcl.eval_classes = local)
    or all of them."""
    if run.cfg.table("fedcl").eval_classes == "all":
        return run.test_x, run.test_y
    held = torch.as_tensor(np.unique(run.data.train_y.numpy()[run.parts[user]]), device=run.test_y.device)
    keep = torch.isin(run.test_y, held)
    return run.test_x[keep], run.test_y[keep]


def user_lr(cfg, user: int) -> float:
    lrs = cfg.table("fedcl").user_lrs
    return lrs[user] if lrs else cfg.train.lr


def build_encoder(run, preset: str) -> SplitEncoder:
    s = run.spec
    return SplitEncoder(preset, s.channels, s.height, s.width, run.cfg.scale).to(run.device)


def build_head(run) -> ClassifierHead:
    return ClassifierHead(run.spec.num_classes, hidden=run.cfg.table("fedcl").head_hidden).to(run.device)


def float_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and float buffers (BatchNorm statistics), cloned to the CPU."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


@torch.no_grad()
def load_float_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    for k, v in state.items():
        own[k].copy_(v)


SPLIT_TASK = "CE(head(channel(encoder(x))), y)"  # the split family classifies: its own head's CE


def split_objective(cfg, *extra: str):
    """The split family's objective: the head's CE on the received features, plus the method's own
    terms, with train.optimizer at train.lr (fedcl.user_lrs, where set, per user)."""
    lrs = cfg.table("fedcl").user_lrs
    terms = extra + ((f"per-user lr {', '.join(f'{lr:g}' for lr in lrs)}",) if lrs else ())
    return Objective(0.0, cfg.train.optimizer, cfg.train.lr, terms, base=SPLIT_TASK)


def task_loss(logits, labels, features, centroids, present, lam):
    """CE + lam * ||f_hat - centroid of its class||^2 (eq 10; FedProto with its own distance)."""
    ce = F.cross_entropy(logits, labels)
    if centroids is None or lam == 0:
        return ce, ce
    mask = present[labels].to(features.dtype)
    reg = (((features - centroids[labels]) ** 2).sum(1) * mask).mean()
    return ce + lam * reg, ce


def local_train_split(encoder, head, channel, x, y, cfg, snr_db: float, generator: torch.Generator, lr: float,
                      optimizer_state: dict | None = None, centroids=None, present=None, lam: float = 0.0,
                      mse: bool = False, num_classes: int = 10):
    """Local epochs on encoder -> channel -> head (FedProto, fedavg-split).

    Returns (mean loss, per-class sums of the received features of the last epoch, per-class counts,
    optimiser state). ``mse`` uses FedProto's mean-squared distance instead of eq 10's squared norm.
    """
    encoder.train()
    head.train()
    params = list(encoder.parameters()) + list(head.parameters())
    opt = make_optimizer(params, cfg.train, lr=lr)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    dim = head.net[0].in_features
    total, count = 0.0, 0
    for epoch in range(cfg.train.local_epochs):
        sums = torch.zeros(num_classes, dim, device=x.device)
        counts = torch.zeros(num_classes, device=x.device)
        for idx in batches(len(x), cfg.train.batch_size, generator):
            images, labels = x[idx], y[idx]
            f_hat = transmit(encoder(images), channel, snr_db)
            weight = lam / f_hat.shape[1] if mse else lam  # MSE = squared norm / dim
            loss, _ = task_loss(head(f_hat), labels, f_hat, centroids, present, weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums.index_add_(0, labels, f_hat.detach())
            counts += torch.bincount(labels, minlength=num_classes).to(counts.dtype)
            total += float(loss.detach()) * len(idx)
            count += len(idx)
    return total / max(count, 1), sums, counts, opt.state_dict()


@torch.no_grad()
def evaluate_split(encoder, head, channel, x, y, snr_db: float, batch_size: int,
                   prototypes: torch.Tensor | None = None) -> dict[str, float]:
    """Test loss (CE) and accuracy of encoder -> channel -> head; with prototypes also the
    nearest-prototype accuracy (``proto_accuracy``)."""
    encoder.eval()
    head.eval()
    ce, correct, proto_correct = 0.0, 0.0, 0.0
    for start in range(0, len(x), batch_size):
        images, labels = x[start:start + batch_size], y[start:start + batch_size]
        f_hat = transmit(encoder(images), channel, snr_db)
        logits = head(f_hat)
        ce += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += float((logits.argmax(1) == labels).sum())
        if prototypes is not None:
            proto_correct += float((torch.cdist(f_hat, prototypes).argmin(1) == labels).sum())
    n = max(len(x), 1)
    out = {"loss": ce / n, "accuracy": correct / n}
    if prototypes is not None:
        out["proto_accuracy"] = proto_correct / n
    return out


@torch.no_grad()
def noisy_features(encoder, channel, x, snr_db: float, batch_size: int = 500) -> torch.Tensor:
    encoder.eval()
    return torch.cat([transmit(encoder(x[s:s + batch_size]), channel, snr_db).cpu()
                      for s in range(0, len(x), batch_size)])


def embed_2d(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """t-SNE with scikit-learn when it is installed, else PCA (numpy SVD). Returns (points, method name)."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        centred = features - features.mean(0, keepdims=True)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        return centred @ vt[:2].T, "PCA (scikit-learn not installed, so no t-SNE)"
    perplexity = min(30.0, max(2.0, (len(features) - 1) / 3))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features), "t-SNE"


def feature_figure(features: torch.Tensor, labels: torch.Tensor, path: Path, title: str, seed: int = 0) -> dict[str, Any]:
    """Paper Fig 4: 2-D embedding of received noisy features, coloured by class."""
    from semfl.report import plots

    if not plots.enabled():  # log.figures = false: no embedding (t-SNE takes seconds)
        return {}
    points, how = embed_2d(features.double().numpy(), seed)
    fig, ax = plots.plt.subplots(figsize=(4.6, 4.2))
    sc = ax.scatter(points[:, 0], points[:, 1], c=labels.cpu().numpy(), cmap="tab10", s=5, vmin=-0.5, vmax=9.5)
    fig.colorbar(sc, ax=ax, ticks=range(10), label="class")
    ax.set_title(f"{title}\n{how}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    plots.save(fig, path)
    return {"feature_embedding": how.split(" ")[0]}


def finish_split(run, method_label: str, pairs: dict[int, tuple[nn.Module, nn.Module]], channel: nn.Module,
                 out_dir, prototypes: torch.Tensor | None = None) -> dict[str, Any]:
    """Artifacts of a split method: feature scatter at fedcl.feature_snr_db (Fig 4) and the test-SNR sweep.

    ``pairs``: user -> (encoder, head), already loaded (users whose models could not be fetched are
    left out); each user is tested on its own test set.
    """
    import json

    from semfl.progress import bar
    from semfl.report import plots
    from semfl.files import atomic_text

    out_dir = Path(out_dir)
    options = run.cfg.table("fedcl")
    summary: dict[str, Any] = {}
    n = min(options.feature_samples, len(run.test_x))
    steps = bar("figures", bool(n) + len(run.cfg.eval.snr_sweep), unit="steps")  # the feature scatter, each SNR
    if n:
        # each user sends (its share of) its own test images through its encoder and the channel
        per_user = max(1, n // len(pairs))
        feats, labels = [], []
        for user, (enc, _) in pairs.items():
            x, y = user_test_set(run, user)
            feats.append(noisy_features(enc, channel, x[:per_user], options.feature_snr_db))
            labels.append(y[:per_user].cpu())
        summary.update(feature_figure(torch.cat(feats), torch.cat(labels), out_dir / "figures" / "features.png",
                                      f"{method_label}: received features at {options.feature_snr_db:g} dB",
                                      run.cfg.seed))
        steps.advance()
    if run.cfg.eval.snr_sweep:
        snrs = list(run.cfg.eval.snr_sweep)
        acc = []
        for snr in snrs:
            rows = [evaluate_split(e, h, channel, *user_test_set(run, user), snr, run.cfg.eval.batch_size, prototypes)
                    for user, (e, h) in pairs.items()]
            acc.append(float(np.mean([r["accuracy"] for r in rows])))
            steps.advance()
        atomic_text(out_dir / "snr_sweep.json", json.dumps({"snr_db": snrs, "models": {method_label: {"accuracy": acc}}},
                                                           indent=1))
        fig, ax = plots.plt.subplots(figsize=(4.2, 3.2))
        ax.plot(snrs, acc, "-o", ms=3, label=method_label)
        ax.set_xlabel("test channel SNR (dB)")
        ax.set_ylabel("accuracy (mean over users)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        plots.save(fig, out_dir / "figures" / "snr_sweep.png")
    steps.close()
    return summary
