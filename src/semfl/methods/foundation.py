"""Foundation GSC mentors: each mentor architecture pretrained once on public images.

PSFL's mentors are large generative models (MAE) that arrive on the user's device already
pretrained on a large corpus; the user then personalises one with PLD. At `cpu` scale no such
checkpoint exists, so semfl builds one: the training images that **no user holds** (the run's
partition decides which) form the public pool, and each GSC architecture is trained on it end
to end — encoder, channel codec, channel at an SNR drawn uniformly from the link's range per
image, decoder — on PLD's task loss (eq 19: MSE + ce_weight * CE of the frozen classifier).
The result is cached like the classifier (every input that changes the weights is in the key),
so a sweep pays for it once per architecture and seed.

Config table ``[foundation]``: off by default (``samples = 0``). With ``samples > 0`` PSFL's
mentors start from it; with ``global_model = true`` too, every FedAvg-family method (PSFL's
student, FedAvg, STC, FTTQ, FedPAQ, top-k) starts its federated model from the foundation of that
model's architecture (a fairness control: are the contenders behind only for lack of pretraining?).
"""
from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from semfl.wireless.channel import preserved_rng
from semfl.config import ConfigError, option, register_table
from semfl.protocol import seeding
from semfl.files import atomic_write, cache_lock
from semfl.training import batches, clip_gradients, reconstruction_loss

_MEMO: dict[str, dict[str, torch.Tensor]] = {}
_CLASSIFIER_DIGESTS: "weakref.WeakKeyDictionary[torch.nn.Module, bytes]" = weakref.WeakKeyDictionary()


def _classifier_digest(classifier: torch.nn.Module) -> bytes:
    """A digest of the frozen classifier's weights, computed once per classifier (every user's
    mentor asks for its foundation, and a paper-scale classifier is tens of millions of weights)."""
    if classifier not in _CLASSIFIER_DIGESTS:
        digest = hashlib.sha256()
        for p in classifier.parameters():
            digest.update(p.detach().cpu().numpy().tobytes())
        _CLASSIFIER_DIGESTS[classifier] = digest.digest()
    return _CLASSIFIER_DIGESTS[classifier]


@dataclass
class FoundationOptions:
    samples: int = option(0, "public images (training images no user holds); 0 = no foundation models")
    epochs: int = option(5, "epochs of the foundation pretraining on the public images")
    lr: float = option(2e-3, "Adam")
    ce_weight: float = option(0.01, "weight of the frozen classifier's CE in the loss (eq 19's task loss)")
    global_model: bool = option(False, "the federated model starts from the foundation too (FedAvg family)")

    def validate(self, cfg) -> None:
        if self.samples < 0 or self.epochs < 0 or self.lr <= 0 or self.ce_weight < 0:
            raise ConfigError("foundation: samples and epochs must be >= 0, lr > 0 and ce_weight >= 0, got "
                              f"samples={self.samples}, epochs={self.epochs}, lr={self.lr}, ce_weight={self.ce_weight}")
        if self.global_model and not self.samples:
            raise ConfigError("foundation.global_model: needs foundation.samples > 0 (the public images to pretrain on)")


register_table("foundation", FoundationOptions)


def public_pool(num_train: int, parts: list, samples: int, seed: int) -> np.ndarray:
    """`samples` training indices held by no user (sorted), drawn with the run's seed."""
    held = np.zeros(num_train, dtype=bool)
    for part in parts:
        held[np.asarray(part, dtype=np.int64)] = True
    free = np.flatnonzero(~held)
    if samples > len(free):
        raise ConfigError(f"foundation.samples: {samples} requested, but only {len(free)} training images "
                          "are held by no user (lower it, or give users a smaller data.user_fraction)")
    rng = seeding.numpy_rng(seed, "foundation-pool")
    return np.sort(rng.choice(free, samples, replace=False))


def _key(arch: str, run, options: FoundationOptions, pool: np.ndarray) -> str:
    """Cache file name: every input that changes the pretrained weights (the model and channel
    settings, the classifier whose CE is in the loss, the pool) is in it or in its digest."""
    cfg = run.cfg
    digest = hashlib.sha256(pool.astype(np.int64).tobytes())
    digest.update(repr((cfg.model.semantic_dim, cfg.model.symbols_per_token, cfg.channel)).encode())
    digest.update(_classifier_digest(run.classifier))
    digest.update(b"channel-seeded")  # caches from before the channel noise was seeded here are not reused
    return (f"foundation-{cfg.dataset}-{arch}-{cfg.scale}-n{len(pool)}-e{options.epochs}"
            f"-lr{options.lr:g}-b{cfg.train.batch_size}-ce{options.ce_weight:g}"
            f"-snr{cfg.link.snr_min_db:g}_{cfg.link.snr_max_db:g}-s{cfg.seed}-{digest.hexdigest()[:12]}.pt")


def train_foundation(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, classifier, *,
                     epochs: int, lr: float, batch_size: int, ce_weight: float, snr_range: tuple[float, float],
                     seed: int, progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Adam on the GSC task loss through the channel, per-image SNR ~ U(snr_range); mean loss per epoch."""
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    low, high = snr_range
    from semfl.progress import bar

    model.train()
    history = []
    steps = bar(f"foundation {type(model).__name__}", epochs * len(images), unit="images", estimate=True)
    for epoch in range(epochs):
        total = 0.0
        for idx in batches(len(images), batch_size, generator):
            x, y = images[idx], labels[idx]
            snr = low + (high - low) * torch.rand(len(idx), generator=generator)
            out = model(x, snr.to(x.device))
            loss, _ = reconstruction_loss(out.recon, x, y, classifier, ce_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(model, 1.0)
            optimiser.step()
            total += float(loss.detach()) * len(idx)
            steps.advance(len(idx))
        history.append(total / len(images))
        if progress is not None:
            progress(epoch, history[-1])
    steps.close()
    return history


def foundation_weights(run, arch: str, build: Callable[[], torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The pretrained weights of `arch` (CPU tensors): from this process, the cache, or trained now."""
    from semfl.models.classifier import run_cache_dir

    cfg = run.cfg
    options: FoundationOptions = cfg.table("foundation")
    pool = public_pool(len(run.data.train_y), run.parts, options.samples, cfg.seed)
    key = _key(arch, run, options, pool)
    if key in _MEMO:
        return _MEMO[key]
    path = Path(run_cache_dir(cfg)) / key
    # the run's random streams must not depend on whether the foundation came from the cache
    with preserved_rng(run.device):
        # torch's generator (initial weights) and Sionna's (the channel noise of pretraining) alike:
        # the weights must not depend on which user's or process's random state asked for them
        seeding.enter(cfg.seed, "foundation-init", arch)
        model = build()
        with cache_lock(path):
            state = _load_or_train(run, arch, options, pool, path, model)
    model.load_state_dict(state)
    weights = {k: p.detach().cpu().clone() for k, p in model.named_parameters()}
    _MEMO[key] = weights
    return weights


def _load_or_train(run, arch: str, options: FoundationOptions, pool: np.ndarray, path: Path, model: torch.nn.Module) -> dict:
    cfg = run.cfg
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a torn or foreign file: say which and how to fix it
            raise RuntimeError(f"foundation mentor cache {path} is unreadable ({exc}); delete it to retrain") from None
        run.log(f"foundation {arch} loaded from {path}")
    else:
        index = torch.from_numpy(pool)
        images = run.data.train_x[index].to(run.device)
        labels = run.data.train_y[index].to(run.device)
        run.log(f"foundation {arch}: pretraining on {len(pool)} public images for {options.epochs} epochs")
        history = train_foundation(
            model, images, labels, run.classifier, epochs=options.epochs, lr=options.lr,
            batch_size=cfg.train.batch_size, ce_weight=options.ce_weight,
            snr_range=(cfg.link.snr_min_db, cfg.link.snr_max_db), seed=seeding.derive_seed(cfg.seed, "foundation", arch),
            progress=lambda e, loss: run.log(f"foundation {arch}: epoch {e + 1}/{options.epochs} loss {loss:.4f}"))
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        atomic_write(path, lambda handle: torch.save(state, handle))
        run.log(f"foundation {arch} cached at {path} (final loss {history[-1]:.4f})" if history else
                f"foundation {arch} cached at {path}")
    return state


def start_from_foundation(run, model: torch.nn.Module, arch: str, build: Callable[[], torch.nn.Module]) -> bool:
    """With ``foundation.global_model``, load the foundation of ``arch`` into the federated ``model``."""
    options: FoundationOptions = run.cfg.table("foundation")
    if not (options.global_model and options.samples):
        return False
    from semfl.training import load_weights

    load_weights(model, foundation_weights(run, arch, build))
    return True
